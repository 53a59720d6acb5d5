"""Publishing jobs' messages through Celery; the outbox's Publisher for real brokers.

A broker that stops answering without closing its sockets (frozen, partitioned) would
hold a publish, and the request or relay run behind it, forever. So messages go out on
a few sender threads of our own, each with its own connection whose every socket wait
is bounded, and the caller waits for progress at most `PUBLISH_DEADLINE_SECONDS`. A
publish given up on may still reach the broker; its job is republished by the relay and
the second message is dropped at claim.

A publish call's messages travel together: on Redis through one pipeline (kombu's
`Producer.batch`), on RabbitMQ written back to back with their confirms read once at
the end. So a batch of jobs costs the broker one round trip, not one per job.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.messaging import Producer
from opentelemetry.trace import SpanKind

from conveyor.config.celery_config import is_amqp
from conveyor.jobs.models import Job, utcnow
from conveyor.jobs.states import JobState
from conveyor.observability import tracing
from conveyor.worker.broker import bounded_connection
from conveyor.worker.confirms import Confirms
from conveyor.worker.messages import RunMessages
from conveyor.worker.redis_transport import Channel as RedisChannel
from conveyor.worker.senders import SENDER_THREADS, Attempt, Senders

# Longer waits stay in the database and are published by the relay when due, since a
# broker holding a long ETA redelivers it at every visibility timeout.
MAX_COUNTDOWN_SECONDS = 30.0
# After a failed publish, skip the broker this long: the relay publishes what waits.
BROKER_DOWN_BACKOFF_SECONDS = 2.0
# A caller stops waiting once no message has gone out for this long.
PUBLISH_DEADLINE_SECONDS = 1.0
# Messages per broker round trip: an API batch (at most 1,000 jobs) goes out in one.
MESSAGES_PER_ROUND_TRIP = 1000
# Redis commands kombu may buffer per message before it flushes early: an LPUSH, plus a
# PEXPIRE per priority step on a queue with an expiry (Conveyor's queues have none).
_COMMANDS_PER_MESSAGE = 5


class BrokerUnavailable(ConnectionError):
    """The broker did not take a publish; callers leave the job to the relay.

    `published` names the jobs whose messages went out before it stopped.
    """

    def __init__(self, message: str, published: Sequence[uuid.UUID] = ()) -> None:
        super().__init__(message)
        self.published = list(published)


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
        self._messages = RunMessages(app)
        self._down_until = 0.0
        self._max_countdown = max_countdown
        self._deadline = deadline
        self._progressed_at = 0.0
        self._senders = Senders(SENDER_THREADS, on_exit=self._release_producer)
        url = app.conf.broker_write_url or app.conf.broker_url or ""
        options = app.conf.broker_transport_options or {}
        # With confirms asked for on RabbitMQ, the publisher reads them itself, per batch.
        self._confirms = is_amqp(url) and bool(options.get("confirm_publish"))
        # Each sender thread keeps its own producer: a connection stuck on a frozen broker
        # belongs to the one thread waiting on it and is never handed to another call.
        self._local = threading.local()

    def publish(self, jobs: Sequence[Job]) -> list[uuid.UUID]:
        """Publish each job; waiting jobs carry a countdown to their due time.

        Raises BrokerUnavailable when the broker failed a publish moments ago, fails this
        one, or the publish makes no progress (no message readied, sent or confirmed) for
        `deadline` seconds.
        """
        if not jobs:
            return []
        if time.monotonic() < self._down_until:
            raise BrokerUnavailable("the broker failed a publish moments ago")
        attempt = Attempt(jobs, self._progressed)
        self._senders.submit(lambda: self._carry(attempt))
        # A batch may take longer than the deadline as long as messages keep going out,
        # and a call waiting for a free sender waits as long as the senders make progress.
        while not attempt.done.wait(max(0.0, self._deadline - self._idle(attempt))):
            if self._idle(attempt) >= self._deadline:
                self._back_off()
                raise BrokerUnavailable(
                    f"the broker took no message for {self._deadline:g} s", attempt.abandon()
                )
        if attempt.error is not None:
            raise BrokerUnavailable(
                f"publish failed: {attempt.error!r}", attempt.published()
            ) from attempt.error
        return attempt.published()

    def _progressed(self) -> None:
        self._progressed_at = time.monotonic()

    def _idle(self, attempt: Attempt) -> float:
        """Seconds since this call, or any other of this publisher, last made progress."""
        return min(attempt.idle(), time.monotonic() - self._progressed_at)

    def _back_off(self) -> None:
        self._down_until = time.monotonic() + BROKER_DOWN_BACKOFF_SECONDS

    def _carry(self, attempt: Attempt) -> None:
        """On a sender thread: publish the attempt's jobs unless its caller gave up."""
        try:
            if not attempt.abandoned:
                try:
                    attempt.context.run(self._send, attempt)
                except Exception:
                    if attempt.published() or attempt.abandoned:
                        raise
                    # A connection gone stale since its last use (a broker restart): once
                    # more on a new one, while the caller still waits.
                    self._release_producer()
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
            # py-amqp's own confirm mode would wait for an ack after every message.
            extra = {"confirm_publish": False} if self._confirms else {}
            producer = self._app.amqp.Producer(bounded_connection(self._app, **extra))
            self._local.producer = producer
            self._local.confirms = None
        return producer

    def _release_producer(self) -> None:
        """Let go of this thread's connection; its next publish opens another."""
        producer: Producer | None = getattr(self._local, "producer", None)
        self._local.producer = None
        self._local.confirms = None
        if producer is not None:
            # Collect, not close: closing politely would wait on the broker once more.
            with contextlib.suppress(Exception):
                producer.connection.collect()

    def _channel_confirms(self, producer: Producer) -> Confirms:
        """The confirm tracker of the producer's current channel, made on first use."""
        confirms: Confirms | None = getattr(self._local, "confirms", None)
        channel = producer.channel
        if confirms is None or confirms.channel is not channel:
            confirms = Confirms(channel)
            self._local.confirms = confirms
        return confirms

    def _due(self, jobs: Sequence[Job]) -> list[tuple[Job, dict[str, Any]]]:
        """The jobs to publish now, each with its countdown; those far ahead wait."""
        now = utcnow()
        due: list[tuple[Job, dict[str, Any]]] = []
        for job in jobs:
            options: dict[str, Any] = {}
            if job.state in (JobState.SCHEDULED, JobState.RETRYING) and job.run_after:
                countdown = (job.run_after - now).total_seconds()
                if countdown > self._max_countdown:
                    continue
                if countdown > 0:
                    options["countdown"] = countdown
            due.append((job, options))
        return due

    def _send(self, attempt: Attempt) -> None:
        producer = self._producer()
        due = self._due(attempt.jobs)
        for queue_name in {job.queue for job, _ in due}:
            self._messages.declare(producer, queue_name)
        for start in range(0, len(due), MESSAGES_PER_ROUND_TRIP):
            chunk = due[start : start + MESSAGES_PER_ROUND_TRIP]
            if self._confirms:
                self._send_confirmed(producer, chunk, attempt)
            else:
                self._send_pipelined(producer, chunk, attempt)
            if attempt.abandoned:
                return

    def _send_pipelined(
        self, producer: Producer, chunk: Sequence[tuple[Job, dict[str, Any]]], attempt: Attempt
    ) -> None:
        """Buffer the chunk's messages and send them at once (one pipeline on Redis).

        kombu sends the buffer when the block ends and drops it when the block raises;
        a pipeline that fails leaves every job of the chunk to the relay, since kombu
        cannot tell which of its messages arrived. Transports without batches (the
        in-process one) publish each message at once. On Conveyor's Redis transport (and
        without tracing, which wraps each message in a span) the messages are built
        whole and written by the channel, in one pipeline too.
        """
        channel = producer.channel
        if isinstance(channel, RedisChannel) and not tracing.enabled():
            self._send_prepared(channel, chunk, attempt)
            return
        try:
            with producer.batch(max_size=len(chunk) * _COMMANDS_PER_MESSAGE):
                for job, options in chunk:
                    if attempt.abandoned:
                        raise _GaveUp
                    self._send_one(producer, job, options)
                    attempt.working()
        except _GaveUp:
            return
        attempt.sent_all([job.id for job, _ in chunk])

    def _send_prepared(
        self,
        channel: RedisChannel,
        chunk: Sequence[tuple[Job, dict[str, Any]]],
        attempt: Attempt,
    ) -> None:
        prepared = []
        for job, options in chunk:
            if attempt.abandoned:
                return
            prepared.append(
                (job.queue, self._messages.redis_message(job, options.get("countdown")))
            )
            attempt.working()
        channel.put_many(prepared)
        attempt.sent_all([job.id for job, _ in chunk])

    def _send_confirmed(
        self, producer: Producer, chunk: Sequence[tuple[Job, dict[str, Any]]], attempt: Attempt
    ) -> None:
        """Write the chunk's messages, then read the broker's confirms for all of them."""
        confirms = self._channel_confirms(producer)
        for job, options in chunk:
            if attempt.abandoned:
                confirms.forget()
                return
            self._send_one(producer, job, options)
            if producer.channel is not confirms.channel:
                # kombu reconnected mid-batch: the new channel numbers its messages anew.
                raise ConnectionError("the broker connection was replaced during a publish")
            confirms.expect(job.id, attempt.sent)
            attempt.working()
        confirms.wait(self._deadline)

    def _send_one(self, producer: Producer, job: Job, options: dict[str, Any]) -> None:
        countdown = options.get("countdown")
        if not tracing.enabled():
            self._messages.publish(producer, job, countdown)
            return
        with tracing.span(
            f"publish {job.task}",
            kind=SpanKind.PRODUCER,
            parent=tracing.from_traceparent(job.traceparent),
            attributes={
                "conveyor.job_id": str(job.id),
                "messaging.destination.name": job.queue,
            },
        ):
            self._messages.publish(producer, job, countdown)


class _GaveUp(Exception):
    """The caller stopped waiting: the batch's buffered messages are dropped."""
