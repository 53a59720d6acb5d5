"""The Celery app built from Settings, with Conveyor's task bodies registered on it."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from celery import Celery, Task

from conveyor.config import MAINTENANCE_QUEUE, RUN_TASK, Settings, celery_config
from conveyor.jobs import outbox, store
from conveyor.jobs.models import Job
from conveyor.tasks import registry
from conveyor.worker.execute import Executor
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.runtime import StoreHandle, worker_name

log = logging.getLogger(__name__)

RELAY_TASK = "conveyor.relay"


def create_celery(settings: Settings, *, store_handle: StoreHandle | None = None) -> Celery:
    """A Celery app for these settings: the run task, the relay, and the beat schedule."""
    app = Celery("conveyor", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = {
        "relay": {
            "task": RELAY_TASK,
            "schedule": settings.relay_interval_seconds,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.relay_interval_seconds * 5},
        }
    }
    # Beat keeps no file: what it schedules is derived from settings and the store.
    app.conf.beat_scheduler = "celery.beat:Scheduler"
    handle = store_handle or StoreHandle(settings.database_url)
    publisher = CeleryPublisher(app)
    executor = Executor(
        sessions=handle.sessions,
        registry=registry,
        worker=lambda: worker_name(),
        lease_seconds=settings.lease_seconds,
        reschedule=lambda job: _publish_one(handle, publisher, job),
    )
    app.conveyor_store = handle
    app.conveyor_publisher = publisher
    app.conveyor_executor = executor

    @app.task(name=RUN_TASK, bind=True, acks_late=True, ignore_result=True)
    def run(self: Task, job_id: str) -> None:
        try:
            parsed = uuid.UUID(job_id)
        except (ValueError, TypeError):
            log.error("dropping a message with a malformed job id: %r", job_id)
            return
        outcome = executor.run(parsed)
        log.debug("job %s: %s", parsed, outcome.action)

    @app.task(name=RELAY_TASK, ignore_result=True)
    def relay() -> int:
        return relay_once(handle, publisher, grace_seconds=settings.relay_grace_seconds)

    return app


def _publish_one(handle: StoreHandle, publisher: CeleryPublisher, job: Job) -> None:
    outbox.publish_recorded(handle.sessions(), publisher, [job])


def relay_once(
    handle: StoreHandle, publisher: CeleryPublisher, *, grace_seconds: float, limit: int = 1000
) -> int:
    """Publish what the broker may be missing: unpublished queued jobs and overdue waiting ones."""
    sessions = handle.sessions()
    now = store.utcnow()
    cutoff = now - dt.timedelta(seconds=grace_seconds)
    with sessions.begin() as session:
        candidates = store.due_for_publish(session, cutoff=cutoff, now=now, limit=limit)
        ready = []
        for job in candidates:
            if job.state.value in ("scheduled", "retrying"):
                promoted = store.promote(session, job.id, now=now)
                if promoted is not None:
                    ready.append(promoted)
            else:
                ready.append(job)
    if ready and outbox.publish_recorded(sessions, publisher, ready):
        log.info("relay published %d jobs", len(ready))
    return len(ready)


def app_for(settings: Settings, **kwargs: Any) -> Celery:
    """Alias kept short for the command line."""
    return create_celery(settings, **kwargs)
