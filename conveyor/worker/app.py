"""The Celery app built from Settings, with Conveyor's task bodies registered on it."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_process_init
from sqlalchemy.exc import InterfaceError, OperationalError

from conveyor.config import MAINTENANCE_QUEUE, RUN_TASK, Settings, celery_config
from conveyor.jobs import outbox, store
from conveyor.jobs.models import Job
from conveyor.tasks import registry
from conveyor.worker.execute import Executor
from conveyor.worker.leases import LeaseKeeper
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.runtime import StoreHandle, worker_name

log = logging.getLogger(__name__)

RELAY_TASK = "conveyor.relay"
RESCUE_TASK = "conveyor.rescue"


def create_celery(settings: Settings, *, store_handle: StoreHandle | None = None) -> Celery:
    """A Celery app for these settings: the run task, the relay, and the beat schedule."""
    app = Celery("conveyor", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = {
        "relay": {
            "task": RELAY_TASK,
            "schedule": settings.relay_interval_seconds,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.relay_interval_seconds * 5},
        },
        "rescue": {
            "task": RESCUE_TASK,
            "schedule": settings.rescue_interval_seconds,
            "options": {
                "queue": MAINTENANCE_QUEUE,
                "expires": settings.rescue_interval_seconds * 3,
            },
        },
    }
    # Beat keeps no file: what it schedules is derived from settings and the store.
    app.conf.beat_scheduler = "celery.beat:Scheduler"
    handle = store_handle or StoreHandle(settings.database_url)
    publisher = CeleryPublisher(app)
    leases = LeaseKeeper(
        sessions=handle.sessions,
        worker=worker_name,
        lease_seconds=settings.lease_seconds,
        interval=min(settings.heartbeat_seconds, settings.lease_seconds / 3),
    )
    executor = Executor(
        sessions=handle.sessions,
        registry=registry,
        worker=lambda: worker_name(),
        lease_seconds=settings.lease_seconds,
        reschedule=lambda job: _publish_one(handle, publisher, job),
        leases=leases,
    )

    @worker_process_init.connect(weak=False)
    def _in_pool_child(**_kwargs: Any) -> None:
        # A prefork child can be stopped by ending it; its pool starts another.
        leases.kill_process = True

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
        try:
            outcome = executor.run(parsed)
        except (OperationalError, InterfaceError) as error:
            # The store is away: send the message round again rather than lose it.
            retries = self.request.retries
            log.warning("job store unavailable for job %s (%s); retrying", parsed, error)
            raise self.retry(countdown=min(2.0**retries, 10.0), max_retries=None) from None
        log.debug("job %s: %s", parsed, outcome.action)

    @app.task(name=RELAY_TASK, ignore_result=True)
    def relay() -> int:
        if broker_forgot(settings.broker_url):
            with handle.sessions().begin() as session:
                count = store.forget_publications(session)
            log.warning("the broker restarted empty; republishing %d queued jobs", count)
        return relay_once(handle, publisher, grace_seconds=settings.relay_grace_seconds)

    @app.task(name=RESCUE_TASK, ignore_result=True)
    def rescue() -> int:
        return rescue_once(handle, publisher)

    return app


EPOCH_KEY = "conveyor:broker-epoch"


def broker_forgot(broker_url: str) -> bool:
    """True once after a Redis broker came back without its data (or on first use).

    A marker key lives in the broker itself: when it is missing, so is every message
    that was queued with it.
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return False
    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    try:
        return bool(client.set(EPOCH_KEY, store.utcnow().isoformat(), nx=True))
    finally:
        client.close()


def rescue_once(handle: StoreHandle, publisher: CeleryPublisher, limit: int = 500) -> int:
    """Requeue (or bury) running jobs whose worker stopped renewing their lease."""
    sessions = handle.sessions()
    requeued: list[Job] = []
    with sessions.begin() as session:
        for job_id in store.expired_leases(session, limit=limit):
            job = store.rescue(session, job_id)
            if job is not None and job.state.value == "queued":
                requeued.append(job)
    if requeued:
        log.warning("rescued %d jobs whose worker stopped responding", len(requeued))
        outbox.publish_recorded(sessions, publisher, requeued)
    return len(requeued)


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
