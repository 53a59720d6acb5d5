"""The beat scheduler: one leader fires built-in periodic work and users' schedules.

Celery beat keeps its schedule in memory and runs one copy per process. Conveyor's
scheduler takes a lease in the database on every tick; only the holder sends anything,
so a second beat is a standby that takes over when the leader's lease lapses. Users'
schedules are read from the database on every tick, so changes apply within seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import replace
from typing import Any

from celery import beat

from conveyor.config import WORKFLOW_TASK
from conveyor.jobs import leader, outbox, schedules
from conveyor.jobs.db import db_now
from conveyor.jobs.models import Job
from conveyor.observability import metrics, tracing
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

log = logging.getLogger(__name__)

LEASE = "beat"
TICK_SECONDS = 1.0


class ConveyorScheduler(beat.Scheduler):  # type: ignore[misc]
    """A Celery beat scheduler that acts only while it holds the beat lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.leading = False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Renew (or try to take) the lease; as leader, fire what is due."""
        app = self.app
        settings = app.conveyor_settings
        metrics.BEAT_TICKS.inc()
        sessions = app.conveyor_store.sessions()
        try:
            with sessions.begin() as session:
                leading = leader.hold(session, LEASE, self.holder, settings.beat_lease_seconds)
        except Exception as error:  # the store is away: stop acting until it answers
            log.warning("beat cannot reach the job store: %s", error)
            self.leading = False
            metrics.BEAT_LEADER.set(0)
            maintainer = getattr(app, "conveyor_maintainer", None)
            if maintainer is not None:
                maintainer.lead(False)
            return TICK_SECONDS
        if leading != self.leading:
            log.info("beat %s %s", self.holder, "leads" if leading else "stands by")
            self.leading = leading
        metrics.BEAT_LEADER.set(1 if leading else 0)
        # The platform's own chores (rescue, relay, rollups, retention) run here, on the
        # leader, whichever pools the deployment serves.
        maintainer = getattr(app, "conveyor_maintainer", None)
        if maintainer is not None:
            maintainer.lead(leading)
        if not leading:
            return TICK_SECONDS
        try:
            fire_due(app, misfire_grace_seconds=settings.misfire_grace_seconds)
        except Exception as error:
            log.warning("could not fire schedules: %s", error)
        wait: float = super().tick(*args, **kwargs)
        return min(wait, TICK_SECONDS)

    def close(self) -> None:
        """Hand the lease over at once when this beat stops."""
        maintainer = getattr(self.app, "conveyor_maintainer", None)
        if maintainer is not None:
            maintainer.stop()
        if self.leading:
            try:
                with self.app.conveyor_store.sessions().begin() as session:
                    leader.release(session, LEASE, self.holder)
            except Exception as error:
                log.warning("could not release the beat lease: %s", error)
        super().close()


def fire_due(app: Any, *, misfire_grace_seconds: float) -> list[Job]:
    """Create the jobs of every due tick of every enabled schedule, and publish them."""
    sessions = app.conveyor_store.sessions()
    created: list[Job] = []
    with sessions() as session:
        now = db_now(session)
        due = schedules.due_schedules(session, now=now)
    for schedule in due:
        ticks, following = schedules.ticks_to_fire(
            schedule, now=now, misfire_grace_seconds=misfire_grace_seconds
        )
        if schedule.task == WORKFLOW_TASK:
            created += _fire_workflows(sessions, schedule, ticks, following, now)
            continue
        try:
            template = build_new_job(
                registry,
                tenant=schedule.tenant,
                task=schedule.task,
                payload=schedule.payload,
                priority=schedule.priority,
            )
            # Each run is a trace of its own.
            new_jobs = [
                replace(
                    template,
                    id=uuid.uuid4(),
                    schedule_id=schedule.id,
                    schedule_tick=tick,
                    traceparent=tracing.new_traceparent(),
                )
                for tick in ticks
            ]
        except Exception as error:  # the task type went away or its schema changed
            log.warning("schedule %s/%s cannot fire: %s", schedule.tenant, schedule.name, error)
            new_jobs = []
        with sessions.begin() as session:
            fired = schedules.fire(session, schedule, new_jobs, following, now=now)
        if fired:
            metrics.count_submitted(fired)
            metrics.SCHEDULE_FIRED.labels(f"{schedule.tenant}/{schedule.name}").inc(len(fired))
        created += fired
    if created:
        outbox.publish_recorded(sessions, app.conveyor_publisher, created)
    return created


def _fire_workflows(
    sessions: Any, schedule: Any, ticks: list[Any], following: Any, now: Any
) -> list[Job]:
    """A schedule that fires a workflow: one per tick, each a trace of its own; the steps
    that can run at once (to publish)."""
    from conveyor.api.schemas import WorkflowIn
    from conveyor.tasks.submission import Origin, build_steps

    runs = []
    try:
        body = WorkflowIn.model_validate(schedule.payload)
        for tick in ticks:
            origin = Origin(tracing.new_traceparent(), None)
            runs.append(
                (tick, build_steps(registry, body.steps, tenant=schedule.tenant, origin=origin))
            )
    except Exception as error:  # a task type went away or its schema changed
        log.warning("schedule %s/%s cannot fire: %s", schedule.tenant, schedule.name, error)
        return []
    with sessions.begin() as session:
        ready = schedules.fire_workflows(
            session,
            schedule,
            runs,
            following,
            name=body.name or schedule.name,
            tags=body.tags,
            now=now,
        )
    if ready:
        metrics.WORKFLOWS_SUBMITTED.inc(len(runs))
        metrics.SCHEDULE_FIRED.labels(f"{schedule.tenant}/{schedule.name}").inc(len(runs))
    return ready
