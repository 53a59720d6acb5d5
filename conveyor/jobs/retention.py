"""Retention: delete finished jobs, their events and old rollups, a small batch at a time.

Each batch is its own short transaction (pick at most `batch_size` ids by the
`finished_at` index, delete their events and them), so workers writing the jobs table
never wait long behind cleanup; on PostgreSQL rows another transaction holds are
skipped and left to the next run.

Only terminal jobs are ever deleted: succeeded and cancelled ones after
`finished_days`, dead ones (the dead-letter queue) after `dead_days`. Queued,
scheduled, retrying and running jobs stay however old they are.

Idempotency keys live on job rows and go with them: a key is remembered for as long
as its job is kept, which is at least `finished_days` after the job finished and
never less than a day (settings refuse less), and for as long as the job is unfinished.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs.states import JobState
from conveyor.jobs.store.driver import driver_for
from conveyor.jobs.tables import anomalies, job_events, job_rollups, jobs

MIN_FINISHED_DAYS = 1.0
# SQLite has one write lock and no queue for it: a waiting writer polls (at most every
# 100 ms), so back-to-back batches could keep it out. A pause between batches lets it in.
SQLITE_PAUSE_SECONDS = 0.1


def _delete_jobs_batch(
    session: Session, states: Sequence[str], cutoff: dt.datetime, batch_size: int
) -> tuple[int, int]:
    """(ids picked, jobs deleted) of one batch of jobs in `states` finished before `cutoff`."""
    pick = (
        select(jobs.c.id)
        .where(jobs.c.finished_at < cutoff, jobs.c.state.in_(states))
        .order_by(jobs.c.finished_at)
        .limit(batch_size)
    )
    # A row being requeued right now is left alone rather than waited for.
    ids = list(session.execute(driver_for(session).skip_locked(pick)).scalars())
    if not ids:
        return 0, 0
    # The foreign key cascades too; deleting first keeps SQLite without it correct.
    session.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
    deleted = session.execute(
        delete(jobs)
        .where(jobs.c.id.in_(ids), jobs.c.finished_at < cutoff, jobs.c.state.in_(states))
        .returning(jobs.c.id)
    ).all()
    return len(ids), len(deleted)


def _delete_anomalies_batch(
    session: Session, cutoff: dt.datetime, batch_size: int
) -> tuple[int, int]:
    """(rows picked, rows deleted) of one batch of episodes that ended before `cutoff`."""
    ids = list(
        session.execute(
            select(anomalies.c.id).where(anomalies.c.ended_at < cutoff).limit(batch_size)
        ).scalars()
    )
    if not ids:
        return 0, 0
    deleted = session.execute(
        delete(anomalies).where(anomalies.c.id.in_(ids)).returning(anomalies.c.id)
    ).all()
    return len(ids), len(deleted)


def _delete_rollups_batch(
    session: Session, cutoff: dt.datetime, batch_size: int
) -> tuple[int, int]:
    """(rows picked, rows deleted) of one batch of rollups older than `cutoff`."""
    minutes = list(
        session.execute(
            select(job_rollups.c.minute)
            .where(job_rollups.c.minute < cutoff)
            .order_by(job_rollups.c.minute)
            .limit(batch_size)
        ).scalars()
    )
    if not minutes:
        return 0, 0
    # Whole minutes go at once: a batch overshoots by at most one minute's rows.
    deleted = session.execute(
        delete(job_rollups)
        .where(job_rollups.c.minute <= minutes[-1], job_rollups.c.minute < cutoff)
        .returning(job_rollups.c.minute)
    ).all()
    return len(minutes), len(deleted)


def _in_batches(
    session_factory: sessionmaker[Session],
    batch: Callable[..., tuple[int, int]],
    *args: Any,
    batch_size: int,
    max_batches: int,
    pause_seconds: float,
) -> int:
    total = 0
    for number in range(max_batches):
        if number and pause_seconds:
            time.sleep(pause_seconds)
        with session_factory.begin() as session:
            picked, deleted = batch(session, *args, batch_size)
        total += deleted
        if picked < batch_size:
            break
    return total


def cleanup(
    session_factory: sessionmaker[Session],
    *,
    now: dt.datetime,
    finished_days: float,
    dead_days: float,
    rollup_days: float,
    batch_size: int = 1000,
    max_batches: int = 50,
    pause_seconds: float | None = None,
) -> dict[str, int]:
    """Delete what is past retention, in short transactions; counts deleted per kind.

    Each kind (finished, dead, rollups, ended anomalies) does at most `max_batches`
    batches per call; what is left goes on the next call. Batches are `pause_seconds`
    apart (by default none on PostgreSQL, SQLITE_PAUSE_SECONDS on SQLite).
    """
    if finished_days < MIN_FINISHED_DAYS:
        raise ValueError("finished jobs (and their idempotency keys) are kept at least a day")
    if min(dead_days, rollup_days) <= 0 or batch_size < 1 or max_batches < 1:
        raise ValueError("retention days, batch size and batch count must be positive")
    if pause_seconds is None:
        with session_factory() as session:
            single_writer = driver_for(session).single_writer
        pause_seconds = SQLITE_PAUSE_SECONDS if single_writer else 0.0
    day = dt.timedelta(days=1)
    finished = [JobState.SUCCEEDED.value, JobState.CANCELLED.value]
    return {
        "finished": _in_batches(
            session_factory,
            _delete_jobs_batch,
            finished,
            now - finished_days * day,
            batch_size=batch_size,
            max_batches=max_batches,
            pause_seconds=pause_seconds,
        ),
        "dead": _in_batches(
            session_factory,
            _delete_jobs_batch,
            [JobState.DEAD.value],
            now - dead_days * day,
            batch_size=batch_size,
            max_batches=max_batches,
            pause_seconds=pause_seconds,
        ),
        "rollups": _in_batches(
            session_factory,
            _delete_rollups_batch,
            now - rollup_days * day,
            batch_size=batch_size,
            max_batches=max_batches,
            pause_seconds=pause_seconds,
        ),
        # Ended anomaly episodes are kept as long as the rollups they were judged on.
        "anomalies": _in_batches(
            session_factory,
            _delete_anomalies_batch,
            now - rollup_days * day,
            batch_size=batch_size,
            max_batches=max_batches,
            pause_seconds=pause_seconds,
        ),
    }
