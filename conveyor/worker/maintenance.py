"""The platform's own periodic work, and the runner the beat leader drives it with.

Rescue of expired leases, the outbox relay (with promotion of due retries and the
search for lost messages), stats rollups with anomaly detection, and retention. They
run inside the beat process while it holds the beat leadership, on threads of their
own, never as messages on a user's queue: whichever pools a deployment serves (any
subset, or none at all while the broker is away), an orphaned job is rescued and a
due retry is published. Each chore is a conditional update in the store, so two
leaders overlapping for a moment cannot double anything.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from conveyor import lazy
from conveyor.config import Settings, dead_letter_queue, is_amqp
from conveyor.jobs.models import Job
from conveyor.observability import metrics
from conveyor.worker.broker import bounded_connection, queue_depths
from conveyor.worker.publisher import CeleryPublisher
from conveyor.worker.runtime import StoreHandle

if TYPE_CHECKING:
    from conveyor.jobs import anomalies, db, outbox, retention, rollups, store
else:
    # A worker registers these chores' tasks but runs them only when asked: the store
    # is loaded by the first (see conveyor.lazy).
    anomalies = lazy.module("conveyor.jobs.anomalies")
    db = lazy.module("conveyor.jobs.db")
    outbox = lazy.module("conveyor.jobs.outbox")
    retention = lazy.module("conveyor.jobs.retention")
    rollups = lazy.module("conveyor.jobs.rollups")
    store = lazy.module("conveyor.jobs.store")

log = logging.getLogger(__name__)

RELAY = "conveyor.relay"
RESCUE = "conveyor.rescue"
AGGREGATE = "conveyor.aggregate"
CLEANUP = "conveyor.cleanup"


def aggregate_once(handle: StoreHandle) -> int:
    """Roll up the complete minutes finished since the last run, then look for anomalies.

    Returns the rollup rows written. Detection has a transaction of its own, after the
    rollups are committed.
    """
    with handle.sessions().begin() as session:
        written = rollups.aggregate(session, now=db.db_now(session))
    with handle.sessions().begin() as session:
        anomalies.detect(session, now=db.db_now(session))
    return written


def cleanup_once(handle: StoreHandle, settings: Settings) -> dict[str, int]:
    """Delete finished jobs, dead jobs and rollups past their retention, in batches."""
    with handle.sessions()() as session:
        now = db.db_now(session)
    deleted = retention.cleanup(
        handle.sessions(),
        now=now,
        finished_days=settings.retention_finished_days,
        dead_days=settings.retention_dead_days,
        rollup_days=settings.retention_rollup_days,
    )
    if any(deleted.values()):
        log.info("retention deleted %s", deleted)
    return deleted


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


def relay_once(
    handle: StoreHandle, publisher: CeleryPublisher, *, grace_seconds: float, limit: int = 1000
) -> int:
    """Publish what the broker may be missing: unpublished queued jobs and due waiting ones.

    Scheduled and retrying jobs whose time has come are promoted to queued here.
    """
    sessions = handle.sessions()
    with sessions.begin() as session:
        now = db.db_now(session)
        cutoff = now - dt.timedelta(seconds=grace_seconds)
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


def sweep_lost_messages(app: Celery, handle: StoreHandle, *, grace_seconds: float) -> int:
    """Mark unpublished the queued jobs whose message the broker no longer has.

    An empty queue with jobs of it still queued lost their messages. A queue with a
    backlog is consumed in order: a queued job published well before one that a worker
    has since started was passed over, so its message is gone too, and it need not wait
    for the backlog to drain. The relay then publishes them again; a message that was
    merely held back by a busy worker becomes a duplicate that the claim drops.
    """
    forgotten = 0
    for queue, depth in queue_depths(app).items():
        with handle.sessions().begin() as session:
            if depth == 0:
                cutoff = db.db_now(session) - dt.timedelta(seconds=grace_seconds)
                forgotten += store.forget_stale_publications(
                    session, queue=queue, published_before=cutoff
                )
            forgotten += store.forget_overtaken_publications(
                session, queue=queue, grace_seconds=grace_seconds
            )
    if forgotten:
        log.warning("%d queued jobs had no message in the broker; publishing again", forgotten)
    return forgotten


def record_broker_dead_letters(app: Celery, handle: StoreHandle, limit: int = 500) -> int:
    """Record messages RabbitMQ dead-lettered, and let the relay publish their jobs again."""
    recorded = 0
    # Bounded: a frozen broker must not hold the leader's relay thread until it wakes.
    with bounded_connection(app) as connection:
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
    client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.set(EPOCH_KEY, dt.datetime.now(dt.UTC).isoformat(), nx=True))
    finally:
        client.close()


def relay_with_checks(
    app: Celery, handle: StoreHandle, publisher: CeleryPublisher, settings: Settings
) -> int:
    """One relay pass: notice a broker that lost its data, then publish what is missing."""
    if broker_forgot(settings.broker_url):
        with handle.sessions().begin() as session:
            count = store.forget_publications(session)
        log.warning("the broker restarted empty; republishing %d queued jobs", count)
    if is_amqp(settings.broker_url):
        record_broker_dead_letters(app, handle)
    try:
        sweep_lost_messages(app, handle, grace_seconds=settings.relay_grace_seconds)
    except Exception as error:  # the broker is away; what is unpublished still goes out
        log.warning("could not look for lost messages: %s", error)
    return relay_once(handle, publisher, grace_seconds=settings.relay_grace_seconds)


@dataclass
class Chore:
    """One piece of periodic work: its name, how often, and its body."""

    name: str
    interval: float
    body: Callable[[], object]
    due: float = 0.0


class Maintainer:
    """Runs chores on their intervals, on background threads, while told it leads.

    Quick chores (rescue, relay) and slow ones (rollups, retention) get a thread each,
    so a long retention pass never delays a rescue.
    """

    def __init__(self, lanes: Sequence[Sequence[Chore]]) -> None:
        self._lanes = [list(lane) for lane in lanes if lane]
        self._leading = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def lead(self, leading: bool) -> None:
        """Start (or keep) running the chores while `leading`; pause them otherwise."""
        if not leading:
            self._leading.clear()
            return
        with self._lock:
            if not self._threads:
                for number, lane in enumerate(self._lanes):
                    thread = threading.Thread(
                        target=self._run,
                        args=(lane,),
                        name=f"conveyor-chores-{number}",
                        daemon=True,
                    )
                    thread.start()
                    self._threads.append(thread)
        self._leading.set()

    def stop(self) -> None:
        """End the chores' threads after the chore each is running."""
        self._stopping.set()
        self._leading.set()

    def _run(self, lane: list[Chore]) -> None:
        while not self._stopping.is_set():
            self._leading.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for chore in lane:
                if now >= chore.due and self._leading.is_set():
                    chore.due = now + chore.interval
                    run_chore(chore)
            upcoming = min(chore.due for chore in lane) - time.monotonic()
            self._stopping.wait(min(max(upcoming, 0.01), 1.0))


def run_chore(chore: Chore) -> None:
    """Run one chore; a failure is logged, and the chore runs again when next due."""
    started = time.perf_counter()
    try:
        chore.body()
    except Exception as error:
        log.warning("%s failed: %s: %s", chore.name, type(error).__name__, error, exc_info=True)
    else:
        log.debug("%s ran in %.3f s", chore.name, time.perf_counter() - started)


def maintainer_for(
    app: Celery, handle: StoreHandle, publisher: CeleryPublisher, settings: Settings
) -> Maintainer:
    """The chores of a Conveyor deployment, with the intervals its settings give."""
    quick = [
        Chore(RESCUE, settings.rescue_interval_seconds, lambda: rescue_once(handle, publisher)),
        Chore(
            RELAY,
            settings.relay_interval_seconds,
            lambda: relay_with_checks(app, handle, publisher, settings),
        ),
    ]
    slow = [
        Chore(AGGREGATE, settings.aggregate_interval_seconds, lambda: aggregate_once(handle)),
        Chore(CLEANUP, settings.cleanup_interval_seconds, lambda: cleanup_once(handle, settings)),
    ]
    return Maintainer([quick, slow])
