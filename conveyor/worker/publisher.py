"""Publishing jobs' messages through Celery; the outbox's Publisher for real brokers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from opentelemetry.trace import SpanKind

from conveyor.config import RUN_TASK
from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.jobs.store import utcnow
from conveyor.observability import tracing

# Longer waits stay in the database and are published by the relay when due, since a
# broker holding a long ETA redelivers it at every visibility timeout.
MAX_COUNTDOWN_SECONDS = 30.0
# After a failed publish, skip the broker this long: the relay publishes what waits.
BROKER_DOWN_BACKOFF_SECONDS = 2.0


class BrokerUnavailable(ConnectionError):
    """The broker refused a publish recently; callers leave the job to the relay."""


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


class CeleryPublisher:
    """Sends one `conveyor.run` message per job to the job's queue."""

    def __init__(self, app: Celery, *, max_countdown: float = MAX_COUNTDOWN_SECONDS) -> None:
        self._app = app
        self._down_until = 0.0
        self._max_countdown = max_countdown

    def publish(self, jobs: Sequence[Job]) -> list[uuid.UUID]:
        """Publish each job; waiting jobs carry a countdown to their due time."""
        published: list[uuid.UUID] = []
        if not jobs:
            return published
        if time.monotonic() < self._down_until:
            raise BrokerUnavailable("the broker refused a publish moments ago")
        try:
            self._send(jobs, published)
        except Exception:
            self._down_until = time.monotonic() + BROKER_DOWN_BACKOFF_SECONDS
            raise
        return published

    def _send(self, jobs: Sequence[Job], published: list[uuid.UUID]) -> None:
        now = utcnow()
        with self._app.producer_or_acquire() as producer:
            for job in jobs:
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
                        **options,
                    )
                published.append(job.id)
