"""The Celery app built from Settings, with Conveyor's task bodies registered on it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import uuid
from typing import Any

import psycopg
import redis
from celery import Celery, Task
from celery.signals import (
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_shutting_down,
)
from opentelemetry.trace import SpanKind
from sqlalchemy.exc import InterfaceError, OperationalError

from conveyor.config import (
    MAINTENANCE_QUEUE,
    RUN_TASK,
    Settings,
    celery_config,
    dead_letter_queue,
    is_amqp,
)
from conveyor.jobs import outbox, store
from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.models import Job
from conveyor.observability import logs, metrics, tracing
from conveyor.tasks import registry
from conveyor.worker.broker import queue_depths
from conveyor.worker.execute import Executor
from conveyor.worker.leases import LeaseKeeper
from conveyor.worker.limiter import limiter_for
from conveyor.worker.maintenance import aggregate_once, cleanup_once
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.runtime import StoreHandle, worker_name

log = logging.getLogger(__name__)


@setup_logging.connect(weak=False)
def _leave_logging_alone(**_kwargs: Any) -> None:
    """Conveyor's processes set up logging themselves (observability.logs): Celery keeps
    its hands off the root logger, so its lines come out in the same format."""


RELAY_TASK = "conveyor.relay"
RESCUE_TASK = "conveyor.rescue"
AGGREGATE_TASK = "conveyor.aggregate"
CLEANUP_TASK = "conveyor.cleanup"


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
        "aggregate": {
            "task": AGGREGATE_TASK,
            "schedule": settings.aggregate_interval_seconds,
            "options": {
                "queue": MAINTENANCE_QUEUE,
                "expires": settings.aggregate_interval_seconds * 2,
            },
        },
        "cleanup": {
            "task": CLEANUP_TASK,
            "schedule": settings.cleanup_interval_seconds,
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.cleanup_interval_seconds},
        },
    }
    # Beat keeps no file: one leader, chosen through the store, schedules everything.
    app.conf.beat_scheduler = "conveyor.beat.scheduler:ConveyorScheduler"
    handle = store_handle or StoreHandle(settings.database_url)
    # RabbitMQ quorum queues hold no delayed messages: every wait stays in the store.
    publisher = CeleryPublisher(app, max_countdown=0.0 if is_amqp(settings.broker_url) else 30.0)
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
        limits=settings.limits,
        fast_path=FastPath(settings.database_url) if not settings.is_sqlite else None,
        limiter=limiter_for(settings) if settings.limits else None,
        rate_horizon=settings.rate_horizon_seconds,
    )

    @worker_shutting_down.connect(weak=False)
    def _bound_the_warm_shutdown(how: str = "", **_kwargs: Any) -> None:
        if how == "Warm":
            start_shutdown_watchdog(settings.shutdown_grace_seconds)

    @worker_process_init.connect(weak=False)
    def _in_pool_child(**_kwargs: Any) -> None:
        # A prefork child can be stopped by ending it; its pool starts another.
        leases.kill_process = True

    @worker_process_shutdown.connect(weak=False)
    def _child_ending(**_kwargs: Any) -> None:
        tracing.flush()

    app.conveyor_settings = settings
    app.conveyor_store = handle
    app.conveyor_publisher = publisher
    app.conveyor_executor = executor

    @app.task(name=RUN_TASK, bind=True, acks_late=True, ignore_result=True, shared=False)
    def run(self: Task, job_id: str) -> None:
        try:
            parsed = uuid.UUID(job_id)
        except (ValueError, TypeError):
            log.error("dropping a message with a malformed job id: %r", job_id)
            return
        request = self.request
        parent = tracing.from_traceparent(getattr(request, "traceparent", None))
        name = getattr(request, "conveyor_task", None) or "job"
        try:
            with (
                logs.bound(request_id=getattr(request, "conveyor_request_id", None)),
                tracing.span(
                    f"run {name}",
                    kind=SpanKind.CONSUMER,
                    parent=parent,
                    attributes={
                        "conveyor.job_id": job_id,
                        "messaging.destination.name": str(
                            (request.delivery_info or {}).get("routing_key") or ""
                        ),
                    },
                ) as span,
            ):
                outcome = executor.run(parsed)
                span.set_attribute("conveyor.outcome", outcome.action)
        except (OperationalError, InterfaceError, psycopg.OperationalError) as error:
            # The store is away: send the message round again rather than lose it.
            retries = self.request.retries
            log.warning("job store unavailable for job %s (%s); retrying", parsed, error)
            raise self.retry(countdown=min(2.0**retries, 10.0), max_retries=None) from None
        log.debug("job %s: %s", parsed, outcome.action)

    @app.task(name=RELAY_TASK, ignore_result=True, shared=False)
    def relay() -> int:
        if broker_forgot(settings.broker_url):
            with handle.sessions().begin() as session:
                count = store.forget_publications(session)
            log.warning("the broker restarted empty; republishing %d queued jobs", count)
        if is_amqp(settings.broker_url):
            record_broker_dead_letters(app, handle)
        sweep_lost_messages(app, handle, grace_seconds=settings.relay_grace_seconds)
        return relay_once(handle, publisher, grace_seconds=settings.relay_grace_seconds)

    @app.task(name=RESCUE_TASK, ignore_result=True, shared=False)
    def rescue() -> int:
        return rescue_once(handle, publisher)

    # Not shared: a shared task joins every app made later in the process, and the
    # first app's closure (its settings and store) would then answer for all of them.
    @app.task(name=AGGREGATE_TASK, ignore_result=True, shared=False)
    def aggregate() -> int:
        return aggregate_once(handle)

    @app.task(name=CLEANUP_TASK, ignore_result=True, shared=False)
    def cleanup() -> dict[str, int]:
        return cleanup_once(handle, settings)

    return app


def start_shutdown_watchdog(grace_seconds: float) -> threading.Timer:
    """After `grace_seconds` of warm shutdown, turn it cold.

    Warm shutdown lets running jobs finish; a job still running when the grace ends is
    cancelled, its message goes back to the broker, and its lease lapses so the job is
    rescued and runs again elsewhere.
    """
    timer = threading.Timer(grace_seconds, os.kill, args=(os.getpid(), signal.SIGQUIT))
    timer.daemon = True
    timer.start()
    return timer


def sweep_lost_messages(app: Celery, handle: StoreHandle, *, grace_seconds: float) -> int:
    """Republish queued jobs of every empty queue whose messages have gone missing."""
    cutoff = store.utcnow() - dt.timedelta(seconds=grace_seconds)
    forgotten = 0
    for queue, depth in queue_depths(app).items():
        if depth:
            continue
        with handle.sessions().begin() as session:
            forgotten += store.forget_stale_publications(
                session, queue=queue, published_before=cutoff
            )
    if forgotten:
        log.warning("%d queued jobs had no message in the broker; publishing again", forgotten)
    return forgotten


def record_broker_dead_letters(app: Celery, handle: StoreHandle, limit: int = 500) -> int:
    """Record messages RabbitMQ dead-lettered, and let the relay publish their jobs again."""
    recorded = 0
    with app.connection_for_write() as connection:
        queue = dead_letter_queue()(connection.default_channel)
        queue.declare()
        for _ in range(limit):
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            job_id = _job_id_of(message.payload)
            if job_id is not None:
                with handle.sessions().begin() as session:
                    job = store.get_job(session, job_id)
                    if job is not None:
                        store.record_dropped_delivery(
                            session, job, worker="rabbitmq", reason="dead-lettered by the broker"
                        )
                        if job.state.value == "queued":
                            store.forget_publication(session, job_id)
                recorded += 1
            message.ack()
    return recorded


def _job_id_of(payload: Any) -> uuid.UUID | None:
    try:
        args = payload[0] if isinstance(payload, list) else payload.get("args")
        return uuid.UUID(str(args[0]))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


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
            elif job is not None and job.state.value == "dead":
                metrics.count_finished(job, "dead")
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
