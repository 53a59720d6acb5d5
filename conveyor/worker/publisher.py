"""Publishing jobs' messages through Celery; the outbox's Publisher for real brokers."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery

from conveyor.config import RUN_TASK
from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.jobs.store import utcnow

# Longer waits stay in the database and are published by the relay when due, since a
# broker holding a long ETA redelivers it at every visibility timeout.
MAX_COUNTDOWN_SECONDS = 600.0
HARD_LIMIT_GRACE_SECONDS = 10.0


class CeleryPublisher:
    """Sends one `conveyor.run` message per job to the job's queue."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def publish(self, jobs: Sequence[Job]) -> list[uuid.UUID]:
        """Publish each job; waiting jobs carry a countdown to their due time."""
        published: list[uuid.UUID] = []
        if not jobs:
            return published
        now = utcnow()
        with self._app.producer_or_acquire() as producer:
            for job in jobs:
                options: dict[str, Any] = {}
                if job.state in (JobState.SCHEDULED, JobState.RETRYING) and job.run_after:
                    countdown = (job.run_after - now).total_seconds()
                    if countdown > MAX_COUNTDOWN_SECONDS:
                        continue
                    if countdown > 0:
                        options["countdown"] = countdown
                self._app.send_task(
                    RUN_TASK,
                    args=[str(job.id)],
                    queue=job.queue,
                    routing_key=job.queue,
                    producer=producer,
                    soft_time_limit=job.timeout_seconds,
                    time_limit=job.timeout_seconds + HARD_LIMIT_GRACE_SECONDS,
                    headers={"conveyor_task": job.task, "conveyor_tenant": job.tenant},
                    **options,
                )
                published.append(job.id)
        return published
