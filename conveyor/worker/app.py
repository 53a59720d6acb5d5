"""The Celery app built from Settings, with Conveyor's task bodies registered on it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import (
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)
from opentelemetry.trace import SpanKind

from conveyor import lazy
from conveyor.config import (
    RUN_TASK,
    Settings,
    celery_config,
    is_amqp,
)
from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.models import Job
from conveyor.observability import logs, tracing
from conveyor.tasks import registry
from conveyor.worker import maintenance
from conveyor.worker.execute import Executor
from conveyor.worker.leases import LeaseKeeper
from conveyor.worker.maintenance import (
    aggregate_once,
    cleanup_once,
    maintainer_for,
    relay_with_checks,
    rescue_once,
)
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.runtime import StoreHandle, worker_name

if TYPE_CHECKING:
    from conveyor.jobs import outbox
else:
    # SQLAlchemy stays out of a worker until a job needs more than the fast path: its
    # pool children fork from this process and hold what it loaded (see conveyor.lazy).
    outbox = lazy.module("conveyor.jobs.outbox")

log = logging.getLogger(__name__)


@setup_logging.connect(weak=False)
def _leave_logging_alone(**_kwargs: Any) -> None:
    """Conveyor's processes set up logging themselves (observability.logs): Celery keeps
    its hands off the root logger, so its lines come out in the same format."""


RELAY_TASK = maintenance.RELAY
RESCUE_TASK = maintenance.RESCUE
AGGREGATE_TASK = maintenance.AGGREGATE
CLEANUP_TASK = maintenance.CLEANUP


def create_celery(settings: Settings, *, store_handle: StoreHandle | None = None) -> Celery:
    """A Celery app for these settings: the run task, the relay, and the beat schedule."""
    app = Celery("conveyor", set_as_current=False)
    app.conf.update(celery_config(settings))
    # Beat keeps no file: one leader, chosen through the store, schedules everything.
    app.conf.beat_scheduler = "conveyor.beat.scheduler:ConveyorScheduler"
    handle = store_handle or StoreHandle(settings.database_url)
    # RabbitMQ quorum queues hold no delayed messages: every wait stays in the store.
    publisher = CeleryPublisher(app, max_countdown=0.0 if is_amqp(settings.broker_url) else 30.0)
    fast_path = FastPath(settings.database_url) if not settings.is_sqlite else None
    leases = LeaseKeeper(
        sessions=handle.sessions,
        worker=worker_name,
        lease_seconds=settings.lease_seconds,
        interval=min(settings.heartbeat_seconds, settings.lease_seconds / 3),
        fast_path=fast_path,
    )
    limiter = None
    if settings.limits:
        from conveyor.worker.limiter import limiter_for

        limiter = limiter_for(settings)
    executor = Executor(
        sessions=handle.sessions,
        registry=registry,
        worker=lambda: worker_name(),
        lease_seconds=settings.lease_seconds,
        reschedule=lambda job: _publish_one(handle, publisher, job),
        leases=leases,
        limits=settings.limits,
        fast_path=fast_path,
        limiter=limiter,
        rate_horizon=settings.rate_horizon_seconds,
        batch_successes=True,
        finished_steps=lambda steps: _publish_released(handle, publisher, steps),
    )

    @worker_shutting_down.connect(weak=False)
    def _bound_the_warm_shutdown(how: str = "", **_kwargs: Any) -> None:
        if how == "Warm":
            start_shutdown_watchdog(settings.shutdown_grace_seconds)

    @worker_process_init.connect(weak=False)
    def _in_pool_child(**_kwargs: Any) -> None:
        # A prefork child can be stopped by ending it; its pool starts another.
        leases.kill_process = True

    def _write_pending_successes() -> None:
        completer = executor.completer
        if completer is not None and not completer.flush(settings.shutdown_grace_seconds):
            # Their leases lapse unrenewed and rescue runs those jobs again.
            log.warning("%d successes were not recorded before exit", completer.pending())

    @worker_process_shutdown.connect(weak=False)
    def _child_ending(**_kwargs: Any) -> None:
        _write_pending_successes()
        tracing.flush()

    @worker_shutdown.connect(weak=False)
    def _worker_ending(**_kwargs: Any) -> None:
        # The threads and solo pools run jobs in this process.
        _write_pending_successes()

    app.conveyor_settings = settings
    app.conveyor_store = handle
    app.conveyor_publisher = publisher
    app.conveyor_executor = executor
    # Run by the beat leader in its own process (see maintenance); the tasks below are
    # the same bodies, for a person or a script that wants one pass now.
    app.conveyor_maintainer = maintainer_for(app, handle, publisher, settings)

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
        except lazy.transient_db_errors() as error:
            # The store is away: send the message round again rather than lose it.
            retries = self.request.retries
            log.warning("job store unavailable for job %s (%s); retrying", parsed, error)
            raise self.retry(countdown=min(2.0**retries, 10.0), max_retries=None) from None
        log.debug("job %s: %s", parsed, outcome.action)

    @app.task(name=RELAY_TASK, ignore_result=True, shared=False)
    def relay() -> int:
        return relay_with_checks(app, handle, publisher, settings)

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


def _publish_one(handle: StoreHandle, publisher: CeleryPublisher, job: Job) -> None:
    outbox.publish_recorded(handle.sessions(), publisher, [job])


def _publish_released(handle: StoreHandle, publisher: CeleryPublisher, steps: list[Job]) -> None:
    """Publish the steps that these finished workflow steps released (queued, without a
    message yet); one the broker does not take now is published by the relay."""
    from conveyor.jobs.store import workflows

    sessions = handle.sessions()
    try:
        with sessions() as session:
            released = workflows.released_after(session, [step.id for step in steps])
    except lazy.transient_db_errors() as error:
        log.warning("could not read the steps released; the relay publishes them: %s", error)
        return
    outbox.publish_recorded(sessions, publisher, released)


def app_for(settings: Settings, **kwargs: Any) -> Celery:
    """Alias kept short for the command line."""
    return create_celery(settings, **kwargs)
