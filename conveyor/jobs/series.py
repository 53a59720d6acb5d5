"""Per-minute series of each task type: what the console draws for the last hour.

Minutes below the rollups' watermark come from `job_rollups`; later ones from the raw
jobs finished since, which are few (the aggregation runs every few seconds).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from conveyor.jobs import quantiles
from conveyor.jobs.rollups import floor_minute, wait_seconds, watermark
from conveyor.jobs.tables import job_rollups, jobs

FAILED_STATES = ("dead",)


@dataclass
class Minute:
    """One minute of one task type: jobs finished by final state, and wait p95."""

    at: dt.datetime
    counts: Counter[str] = field(default_factory=Counter)
    wait_p95: float | None = None

    @property
    def finished(self) -> int:
        """Jobs that reached a terminal state in this minute."""
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        """Jobs that died in this minute."""
        return sum(self.counts.get(state, 0) for state in FAILED_STATES)


@dataclass
class TaskSeries:
    """A task type's minutes, oldest first, with none missing."""

    task: str
    minutes: list[Minute]

    @property
    def finished(self) -> int:
        """Jobs finished over the whole series."""
        return sum(m.finished for m in self.minutes)

    @property
    def failure_rate(self) -> float | None:
        """The share of finished jobs that died; None when none finished."""
        done = self.finished
        return None if done == 0 else sum(m.failed for m in self.minutes) / done


def minute_series(
    session: Session, *, tenant: str, since: dt.datetime, now: dt.datetime
) -> list[TaskSeries]:
    """Each task type's minutes from floor(since) to now, by task name."""
    start = floor_minute(since)
    count = int((floor_minute(now) - start).total_seconds() // 60) + 1
    by_task: dict[str, dict[dt.datetime, Minute]] = {}

    def minute(task: str, at: dt.datetime) -> Minute:
        minutes = by_task.setdefault(task, {})
        return minutes.setdefault(at, Minute(at))

    mark = watermark(session)
    tail_from = start if mark is None else max(mark, start)
    if mark is not None and mark > start:
        rows = session.execute(
            select(job_rollups.c.task, job_rollups.c.minute, job_rollups.c.counts)
            .add_columns(job_rollups.c.wait_p95)
            .where(
                job_rollups.c.tenant == tenant,
                job_rollups.c.minute >= start,
                job_rollups.c.minute < mark,
            )
        )
        for task, at, counts, wait_p95 in rows:
            found = minute(task, at if at.tzinfo else at.replace(tzinfo=dt.UTC))
            found.counts.update(counts or {})
            found.wait_p95 = wait_p95
    waits: dict[tuple[str, dt.datetime], list[float]] = {}
    tail = session.execute(
        select(jobs.c.task, jobs.c.state, jobs.c.scheduled_at, jobs.c.started_at)
        .add_columns(jobs.c.finished_at)
        .where(jobs.c.tenant == tenant, jobs.c.finished_at >= tail_from, jobs.c.finished_at <= now)
    )
    for task, state, scheduled_at, started_at, finished_at in tail:
        at = floor_minute(finished_at)
        minute(task, at).counts[state] += 1
        wait = wait_seconds(scheduled_at, started_at)
        if wait is not None:
            waits.setdefault((task, at), []).append(wait)
    for (task, at), values in waits.items():
        minute(task, at).wait_p95 = quantiles.exact(values).p95
    return [
        TaskSeries(
            task,
            [
                minutes.get(
                    start + dt.timedelta(minutes=i), Minute(start + dt.timedelta(minutes=i))
                )
                for i in range(count)
            ],
        )
        for task, minutes in sorted(by_task.items())
    ]
