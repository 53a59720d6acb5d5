"""Publishing jobs' messages through Celery; the outbox's Publisher for real brokers.

A broker that stops answering without closing its sockets (frozen, partitioned) would
hold a publish, and the request or relay run behind it, forever. So messages go out on
a few sender threads of our own, each with its own connection whose every socket wait
is bounded, and the caller waits for progress at most `PUBLISH_DEADLINE_SECONDS`. A
publish given up on may still reach the broker; its job is republished by the relay and
the second message is dropped at claim.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from kombu.messaging import Producer
from opentelemetry.trace import SpanKind

from conveyor.config import RUN_TASK
from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.jobs.store import utcnow
from conveyor.observability import tracing
from conveyor.worker.broker import bounded_connection

# Longer waits stay in the database and are published by the relay when due, since a
# broker holding a long ETA redelivers it at every visibility timeout.
MAX_COUNTDOWN_SECONDS = 30.0
# After a failed publish, skip the broker this long: the relay publishes what waits.
BROKER_DOWN_BACKOFF_SECONDS = 2.0
# A caller stops waiting once no message has gone out for this long.
PUBLISH_DEADLINE_SECONDS = 1.0
# Publishes in flight at once per publisher; a frozen broker can hold at most these.
SENDER_THREADS = 4
# A sender thread (and its connection) with nothing to do for this long ends.
SENDER_IDLE_SECONDS = 60.0


class BrokerUnavailable(ConnectionError):
    """The broker did not take a publish; callers leave the job to the relay.

    `published` names the jobs whose messages went out before it stopped.
    """

    def __init__(self, message: str, published: Sequence[uuid.UUID] = ()) -> None:
        super().__init__(message)
        self.published = list(published)


HARD_LIMIT_GRACE_SECONDS = 10.0


def message_headers(job: Job) -> dict[str, str]:
    """Headers of a job's message: what it is, and the trace and request it belongs to."""
    headers = {"conveyor_task": job.task, "conveyor_tenant": job.tenant}
    # Inside the publish span: the run becomes its child. Else the job's own trace.
    traceparent = tracing.current_traceparent() or job.traceparent
    if traceparent:
        headers["traceparent"] = traceparent
    if job.request_id:
        headers["conveyor_request_id"] = job.request_id
    return headers


class _Attempt:
    """One publish call handed to a sender thread; its caller may stop waiting for it."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = jobs
        # The caller's trace and log fields, for the spans and lines of the sender thread.
        self.context = contextvars.copy_context()
        self.done = threading.Event()
        self.error: Exception | None = None
        self._lock = threading.Lock()
        self._published: list[uuid.UUID] = []
        self._abandoned = False
        self._progressed_at = time.monotonic()

    @property
    def abandoned(self) -> bool:
        """The caller gave up: send nothing more."""
        return self._abandoned

    def idle(self) -> float:
        """Seconds since the last message went out (or since the call began)."""
        return time.monotonic() - self._progressed_at

    def sent(self, job_id: uuid.UUID) -> None:
        """Record a message the broker took."""
        with self._lock:
            self._published.append(job_id)
            self._progressed_at = time.monotonic()

    def published(self) -> list[uuid.UUID]:
        """The jobs whose messages went out so far."""
        with self._lock:
            return list(self._published)

    def abandon(self) -> list[uuid.UUID]:
        """Stop the sender before its next message; the jobs it had sent by now."""
        with self._lock:
            self._abandoned = True
            return list(self._published)


class _Senders:
    """Up to `size` daemon threads that carry publishes; an idle one ends after a while.

    Daemon threads rather than an executor: a process that exits while one is stuck on a
    frozen broker must not wait for it.
    """

    def __init__(self, size: int, on_exit: Callable[[], None]) -> None:
        self._size = size
        self._on_exit = on_exit
        self._reset()
        # Threads do not survive a fork: a prefork child starts its own on first use.
        ref = weakref.ref(self)

        def forget_in_child() -> None:
            senders = ref()
            if senders is not None:
                senders._reset()

        os.register_at_fork(after_in_child=forget_in_child)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        """Run `task` on a sender thread; a new one starts when none is idle (up to `size`)."""
        with self._lock:
            self._tasks.put(task)
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(
                    target=self._serve,
                    args=(self._tasks,),
                    name=f"conveyor-publish-{self._threads}",
                    daemon=True,
                ).start()

    def _serve(self, tasks: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                task = tasks.get(timeout=SENDER_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    # Checked under the lock `submit` puts under: no task is left behind.
                    if tasks.empty():
                        self._threads -= 1
                        break
                continue
            with self._lock:
                self._idle -= 1
            try:
                task()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                raise
        self._on_exit()


class CeleryPublisher:
    """Sends one `conveyor.run` message per job to the job's queue, within a deadline."""

    def __init__(
        self,
        app: Celery,
        *,
        max_countdown: float = MAX_COUNTDOWN_SECONDS,
        deadline: float = PUBLISH_DEADLINE_SECONDS,
    ) -> None:
        self._app = app
        self._down_until = 0.0
        self._max_countdown = max_countdown
        self._deadline = deadline
        self._senders = _Senders(SENDER_THREADS, on_exit=self._release_producer)
        # Each sender thread keeps its own producer: a connection stuck on a frozen broker
        # belongs to the one thread waiting on it and is never handed to another call.
        self._local = threading.local()

    def publish(self, jobs: Sequence[Job]) -> list[uuid.UUID]:
        """Publish each job; waiting jobs carry a countdown to their due time.

        Raises BrokerUnavailable when the broker failed a publish moments ago, fails this
        one, or takes no message for `deadline` seconds.
        """
        if not jobs:
            return []
        if time.monotonic() < self._down_until:
            raise BrokerUnavailable("the broker failed a publish moments ago")
        attempt = _Attempt(jobs)
        self._senders.submit(lambda: self._carry(attempt))
        # A batch may take longer than the deadline as long as messages keep going out.
        while not attempt.done.wait(max(0.0, self._deadline - attempt.idle())):
            if attempt.idle() >= self._deadline:
                self._back_off()
                raise BrokerUnavailable(
                    f"the broker took no message for {self._deadline:g} s", attempt.abandon()
                )
        if attempt.error is not None:
            raise BrokerUnavailable(
                f"publish failed: {attempt.error!r}", attempt.published()
            ) from attempt.error
        return attempt.published()

    def _back_off(self) -> None:
        self._down_until = time.monotonic() + BROKER_DOWN_BACKOFF_SECONDS

    def _carry(self, attempt: _Attempt) -> None:
        """On a sender thread: publish the attempt's jobs unless its caller gave up."""
        try:
            if not attempt.abandoned:
                attempt.context.run(self._send, attempt)
        except Exception as error:
            attempt.error = error
            self._back_off()
            self._release_producer()
        finally:
            attempt.done.set()

    def _producer(self) -> Producer:
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            producer = self._app.amqp.Producer(bounded_connection(self._app))
            self._local.producer = producer
        return producer

    def _release_producer(self) -> None:
        """Let go of this thread's connection; its next publish opens another."""
        producer: Producer | None = getattr(self._local, "producer", None)
        self._local.producer = None
        if producer is not None:
            # Collect, not close: closing politely would wait on the broker once more.
            with contextlib.suppress(Exception):
                producer.connection.collect()

    def _send(self, attempt: _Attempt) -> None:
        producer = self._producer()
        now = utcnow()
        for job in attempt.jobs:
            if attempt.abandoned:
                return
            options: dict[str, Any] = {}
            if job.state in (JobState.SCHEDULED, JobState.RETRYING) and job.run_after:
                countdown = (job.run_after - now).total_seconds()
                if countdown > self._max_countdown:
                    continue
                if countdown > 0:
                    options["countdown"] = countdown
            with tracing.span(
                f"publish {job.task}",
                kind=SpanKind.PRODUCER,
                parent=tracing.from_traceparent(job.traceparent),
                attributes={
                    "conveyor.job_id": str(job.id),
                    "messaging.destination.name": job.queue,
                },
            ):
                self._app.send_task(
                    RUN_TASK,
                    args=[str(job.id)],
                    queue=job.queue,
                    routing_key=job.queue,
                    producer=producer,
                    soft_time_limit=job.timeout_seconds,
                    time_limit=job.timeout_seconds + HARD_LIMIT_GRACE_SECONDS,
                    headers=message_headers(job),
                    # With publisher confirms (RabbitMQ), wait for the ack no longer.
                    confirm_timeout=self._deadline,
                    **options,
                )
            attempt.sent(job.id)
