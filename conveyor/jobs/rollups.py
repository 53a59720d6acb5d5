"""Per-minute rollups of finished jobs, built incrementally, and the stats read from them.

`aggregate` turns the jobs that finished since the watermark (the `marks` row named
"aggregate") into one `job_rollups` row per tenant, task type and minute of finishing,
then moves the watermark on. It reads jobs through `ix_jobs_finished_at` by a range that
starts at the watermark, so its cost follows the rows new since the last run, not the
size of the table. Only complete minutes older than `lag_seconds` are rolled up: a job
whose transaction commits more than the lag after its `finished_at` is missed by the
rollups (its row is still in the table).

`window_stats` answers `/v1/stats`: rollup rows of the window, plus the raw jobs that
finished after the watermark (at most a minute and the lag's worth), plus unfinished
jobs created in the window, so a job that finished a moment ago is counted already.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.orm import Session

from conveyor.jobs import quantiles
from conveyor.jobs.quantiles import Quantiles
from conveyor.jobs.states import TERMINAL_STATES, JobState
from conveyor.jobs.store.locks import try_transaction_lock
from conveyor.jobs.tables import job_rollups, jobs, marks

MARK = "aggregate"
MINUTE = dt.timedelta(minutes=1)
# Bounds one call's work after a long pause; the next call carries on.
MAX_MINUTES_PER_CALL = 60
# pg_try_advisory_xact_lock key of the aggregator: two concurrent runs would roll up
# the same minutes twice.
_LOCK_KEY = 0x636F6E7665796F72  # "conveyor"

_UNFINISHED = [s.value for s in JobState if s not in TERMINAL_STATES]


def floor_minute(at: dt.datetime) -> dt.datetime:
    """The start of the UTC minute holding `at`."""
    return at.astimezone(dt.UTC).replace(second=0, microsecond=0)


def run_seconds(
    state: str, started_at: dt.datetime | None, finished_at: dt.datetime
) -> float | None:
    """A finished job's run time: succeeded jobs only, from their last start."""
    if state != JobState.SUCCEEDED.value or started_at is None:
        return None
    return max(0.0, (finished_at - started_at).total_seconds())


def wait_seconds(scheduled_at: dt.datetime | None, started_at: dt.datetime | None) -> float | None:
    """A job's queue wait, from its due time to its (last) start; None if it never started."""
    if started_at is None or scheduled_at is None:
        return None
    return max(0.0, (started_at - scheduled_at).total_seconds())


@dataclass
class _Minute:
    counts: Counter[str] = field(default_factory=Counter)
    runs: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)

    def add(
        self,
        state: str,
        scheduled_at: dt.datetime | None,
        started_at: dt.datetime | None,
        finished_at: dt.datetime,
    ) -> None:
        self.counts[state] += 1
        run = run_seconds(state, started_at, finished_at)
        if run is not None:
            self.runs.append(run)
        wait = wait_seconds(scheduled_at, started_at)
        if wait is not None:
            self.waits.append(wait)

    def row(self, tenant: str, task: str, minute: dt.datetime) -> dict[str, Any]:
        run = quantiles.exact(self.runs)
        wait = quantiles.exact(self.waits)
        return {
            "tenant": tenant,
            "task": task,
            "minute": minute,
            "counts": dict(sorted(self.counts.items())),
            "run_p50": run.p50,
            "run_p95": run.p95,
            "run_p99": run.p99,
            "wait_p50": wait.p50,
            "wait_p95": wait.p95,
            "wait_p99": wait.p99,
            "run_histogram": quantiles.histogram_to_json(quantiles.histogram(self.runs)),
            "wait_histogram": quantiles.histogram_to_json(quantiles.histogram(self.waits)),
        }


def watermark(session: Session) -> dt.datetime | None:
    """Where aggregation has got to: every job finished before it is rolled up."""
    at: dt.datetime | None = session.execute(
        select(marks.c.at).where(marks.c.name == MARK)
    ).scalar_one_or_none()
    return at


def set_watermark(session: Session, at: dt.datetime) -> None:
    """Move the watermark; moved back, the next runs redo those minutes from the jobs kept."""
    moved = session.execute(
        update(marks).where(marks.c.name == MARK).values(at=at).returning(marks.c.name)
    ).first()
    if moved is None:
        session.execute(insert(marks).values(name=MARK, at=at))


def first_finished_query(mark: dt.datetime | None) -> Select[dt.datetime | None]:
    """The earliest finished_at at or after `mark`: one step down ix_jobs_finished_at."""
    query = select(func.min(jobs.c.finished_at))
    return query if mark is None else query.where(jobs.c.finished_at >= mark)


def finished_query(start: dt.datetime, end: dt.datetime) -> Select[Any]:
    """What aggregation reads of jobs finished in [start, end): a range of ix_jobs_finished_at."""
    return select(
        jobs.c.tenant,
        jobs.c.task,
        jobs.c.state,
        jobs.c.scheduled_at,
        jobs.c.started_at,
        jobs.c.finished_at,
    ).where(jobs.c.finished_at >= start, jobs.c.finished_at < end)


def aggregate(
    session: Session,
    *,
    now: dt.datetime,
    lag_seconds: float = 5.0,
    max_minutes: int = MAX_MINUTES_PER_CALL,
) -> int:
    """Roll up complete minutes past the watermark into job_rollups; returns rows written.

    The caller owns the transaction; rollup rows and the watermark move together.
    Returns 0 at once when another aggregation holds the lock.
    """
    if not try_transaction_lock(session, _LOCK_KEY):
        return 0
    mark = watermark(session)
    horizon = floor_minute(now - dt.timedelta(seconds=lag_seconds))
    first: dt.datetime | None = session.execute(first_finished_query(mark)).scalar_one()
    if first is None or floor_minute(first) >= horizon:
        # Nothing finished in complete minutes since the mark: skip the empty stretch.
        if mark is None or horizon > mark:
            set_watermark(session, horizon)
        return 0
    start = floor_minute(first)
    end = min(start + max_minutes * MINUTE, horizon)
    minutes: dict[tuple[str, str, dt.datetime], _Minute] = {}
    rows = session.execute(finished_query(start, end))
    for tenant, task, state, scheduled_at, started_at, finished_at in rows:
        key = (tenant, task, floor_minute(finished_at))
        minutes.setdefault(key, _Minute()).add(state, scheduled_at, started_at, finished_at)
    # Replacing the minutes whole keeps a rerun over them (a moved-back mark) exact.
    session.execute(
        delete(job_rollups).where(job_rollups.c.minute >= start, job_rollups.c.minute < end)
    )
    if minutes:
        session.execute(
            insert(job_rollups),
            [acc.row(tenant, task, minute) for (tenant, task, minute), acc in minutes.items()],
        )
    set_watermark(session, end)
    return len(minutes)


@dataclass(frozen=True, slots=True)
class TaskWindow:
    """One task type over a window: counts by state and percentiles."""

    task: str
    counts: dict[str, int]
    run_seconds: Quantiles
    queue_wait_seconds: Quantiles


@dataclass
class _Distribution:
    """Samples of one measure from rollup rows (histograms) and raw jobs (values)."""

    histograms: list[Counter[int]] = field(default_factory=list)
    stored: Quantiles = field(default_factory=Quantiles)
    values: list[float] = field(default_factory=list)

    def add_row(self, histogram: Mapping[str, int] | None, stored: Quantiles) -> None:
        parsed = quantiles.histogram_from_json(histogram)
        if parsed:
            self.histograms.append(parsed)
            self.stored = stored

    def result(self) -> Quantiles:
        if not self.histograms:
            return quantiles.rounded(quantiles.exact(self.values))
        if len(self.histograms) == 1 and not self.values:
            # One minute's rollup holds its exact percentiles.
            return quantiles.rounded(self.stored)
        merged = quantiles.merge([*self.histograms, quantiles.histogram(self.values)])
        return quantiles.rounded(quantiles.from_histogram(merged))


@dataclass
class _Task:
    counts: Counter[str] = field(default_factory=Counter)
    run: _Distribution = field(default_factory=_Distribution)
    wait: _Distribution = field(default_factory=_Distribution)


def window_stats(
    session: Session, *, tenant: str | None, since: dt.datetime, now: dt.datetime
) -> list[TaskWindow]:
    """Per task type: jobs finished since floor(since) and unfinished ones created since.

    Minutes below the watermark come from rollups (percentiles within one 10 % bucket
    when several minutes merge); later ones from the raw jobs, which are few.
    """
    start = floor_minute(since)
    mark = watermark(session)
    tail_from = start if mark is None else max(mark, start)
    tasks: dict[str, _Task] = {}
    if mark is not None and mark > start:
        rollup_query = select(job_rollups).where(
            job_rollups.c.minute >= start, job_rollups.c.minute < mark
        )
        if tenant is not None:
            rollup_query = rollup_query.where(job_rollups.c.tenant == tenant)
        for row in session.execute(rollup_query).mappings():
            acc = tasks.setdefault(row["task"], _Task())
            acc.counts.update(row["counts"] or {})
            acc.run.add_row(
                row["run_histogram"], Quantiles(row["run_p50"], row["run_p95"], row["run_p99"])
            )
            acc.wait.add_row(
                row["wait_histogram"],
                Quantiles(row["wait_p50"], row["wait_p95"], row["wait_p99"]),
            )
    tail_query = select(
        jobs.c.task, jobs.c.state, jobs.c.scheduled_at, jobs.c.started_at, jobs.c.finished_at
    ).where(jobs.c.finished_at >= tail_from, jobs.c.finished_at <= now)
    if tenant is not None:
        tail_query = tail_query.where(jobs.c.tenant == tenant)
    for task, state, scheduled_at, started_at, finished_at in session.execute(tail_query):
        acc = tasks.setdefault(task, _Task())
        acc.counts[state] += 1
        run = run_seconds(state, started_at, finished_at)
        if run is not None:
            acc.run.values.append(run)
        wait = wait_seconds(scheduled_at, started_at)
        if wait is not None:
            acc.wait.values.append(wait)
    # The backlog is small next to the table; the state index finds it.
    unfinished_query = (
        select(jobs.c.task, jobs.c.state, func.count())
        .where(jobs.c.state.in_(_UNFINISHED), jobs.c.created_at >= since)
        .group_by(jobs.c.task, jobs.c.state)
    )
    if tenant is not None:
        unfinished_query = unfinished_query.where(jobs.c.tenant == tenant)
    for task, state, count in session.execute(unfinished_query):
        tasks.setdefault(task, _Task()).counts[state] += int(count)
    return [
        TaskWindow(
            task=task,
            counts={s: n for s, n in sorted(acc.counts.items()) if n},
            run_seconds=acc.run.result(),
            queue_wait_seconds=acc.wait.result(),
        )
        for task, acc in sorted(tasks.items())
    ]
