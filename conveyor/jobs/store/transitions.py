"""The job's transitions from submission through its runs: one function per transition.

Every function takes the caller's session and never commits: the caller owns the
transaction. A transition that finds the row in a state it may not leave returns None
and writes nothing; the caller decides what that means. Each is one conditional UPDATE
with its event; what differs by database is the driver's.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import or_
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, JobError, NewJob
from conveyor.jobs.states import TERMINAL_STATES, WAITING_STATES, JobState
from conveyor.jobs.store.driver import database_now, driver_for
from conveyor.jobs.store.reads import get_job
from conveyor.jobs.store.writes import (
    bury,
    error_values,
    held_by,
    record_event,
    unheld_values,
    update_job,
)
from conveyor.jobs.tables import jobs


def create_jobs(
    session: Session, new_jobs: Sequence[NewJob], *, now: dt.datetime | None = None
) -> list[Job]:
    """Record new jobs (queued, or scheduled when their run time is ahead), in order.

    Each job gets its `created` event. Without `now`, the database's clock decides which
    jobs are still waiting.
    """
    if not new_jobs:
        return []
    return driver_for(session).create_jobs(session, new_jobs, now=now)


def create_job(session: Session, new: NewJob, *, now: dt.datetime | None = None) -> Job:
    """Record one new job."""
    return create_jobs(session, [new], now=now)[0]


def claim(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    lease_seconds: float,
    now: dt.datetime | None = None,
    limit_key: str | None = None,
) -> Job | None:
    """queued → running for `worker`, counting an attempt and taking the next lease token.

    None if not queued or exhausted. Without `now`, the lease is timed by the
    database's clock (inside the statement on PostgreSQL).
    """
    return driver_for(session).claim(
        session, job_id, worker=worker, lease_seconds=lease_seconds, now=now, limit_key=limit_key
    )


def promote(session: Session, job_id: uuid.UUID, *, now: dt.datetime | None = None) -> Job | None:
    """scheduled or retrying → queued once its due time has come."""
    now = database_now(session, now)
    before = get_job(session, job_id)
    if before is None:
        return None
    job = update_job(
        session,
        job_id,
        [
            jobs.c.state.in_([s.value for s in WAITING_STATES]),
            jobs.c.run_after <= now,
            # A retry waiting for its cancelled run to stop (see requeue) stays put.
            or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at <= now),
        ],
        {
            "state": JobState.QUEUED.value,
            "run_after": None,
            "published_at": None,
            "updated_at": now,
        },
    )
    if job is not None:
        record_event(session, job, "promoted", before.state, at=now)
    return job


def succeed(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    token: int,
    result: Any,
    now: dt.datetime | None = None,
) -> Job | None:
    """running → succeeded, only for the run holding lease token `token`."""
    return driver_for(session).succeed(
        session, job_id, worker=worker, token=token, result=result, now=now
    )


def fail_retry(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    token: int,
    error: JobError,
    delay_seconds: float,
    now: dt.datetime | None = None,
) -> Job | None:
    """running → retrying for `delay_seconds`; None if no attempts are left or not held."""
    now = database_now(session, now)
    run_after = now + dt.timedelta(seconds=delay_seconds)
    job = update_job(
        session,
        job_id,
        [*held_by(worker, token), jobs.c.attempts < jobs.c.max_attempts],
        {
            "state": JobState.RETRYING.value,
            "run_after": run_after,
            "published_at": None,
            "lease_expires_at": None,
            "updated_at": now,
            **error_values(error),
        },
    )
    if job is not None:
        delay = (run_after - now).total_seconds()
        record_event(
            session,
            job,
            "failed",
            JobState.RUNNING,
            at=now,
            worker=worker,
            detail={"error_type": error.type, "retry_in_seconds": round(delay, 3)},
        )
    return job


def dead(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    token: int,
    error: JobError,
    now: dt.datetime | None = None,
) -> Job | None:
    """running → dead: attempts exhausted or a permanent error."""
    return bury(
        session,
        job_id,
        held_by(worker, token),
        error=error,
        from_state=JobState.RUNNING,
        worker=worker,
        now=database_now(session, now),
    )


def exhaust(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    error: JobError,
    now: dt.datetime | None = None,
) -> Job | None:
    """queued with no attempts left → dead (a message that kept killing its worker)."""
    return bury(
        session,
        job_id,
        [jobs.c.state == JobState.QUEUED.value, jobs.c.attempts >= jobs.c.max_attempts],
        error=error,
        from_state=JobState.QUEUED,
        worker=worker,
        now=database_now(session, now),
    )


def release(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    token: int,
    reason: str,
    now: dt.datetime | None = None,
) -> Job | None:
    """running → queued without counting a failure (shutdown, lost worker)."""
    now = database_now(session, now)
    job = update_job(
        session,
        job_id,
        held_by(worker, token),
        unheld_values(now),
    )
    if job is not None:
        record_event(
            session,
            job,
            "released",
            JobState.RUNNING,
            at=now,
            worker=worker,
            detail={"reason": reason},
        )
    return job


def defer(
    session: Session,
    job_id: uuid.UUID,
    *,
    run_after: dt.datetime,
    reason: str,
    slot_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> Job | None:
    """queued → scheduled until `run_after`: the job is over a flow-control limit.

    It does not fail and uses no attempt. `slot_at` is set while it waits for a rate
    limit (the time its limit is expected to have room), None for other waits.
    """
    now = database_now(session, now)
    values: dict[str, Any] = {
        "state": JobState.SCHEDULED.value,
        "run_after": run_after,
        "published_at": None,
        "updated_at": now,
        "slot_at": slot_at,
    }
    job = update_job(session, job_id, [jobs.c.state == JobState.QUEUED.value], values)
    if job is not None:
        record_event(
            session,
            job,
            "deferred",
            JobState.QUEUED,
            at=now,
            detail={"reason": reason, "until": run_after.isoformat()},
        )
    return job


def record_dropped_delivery(
    session: Session,
    job: Job,
    *,
    worker: str,
    reason: str,
    now: dt.datetime | None = None,
) -> None:
    """Note a delivery that was acknowledged without running (already running or finished)."""
    record_event(
        session,
        job,
        "delivery_dropped",
        job.state,
        at=database_now(session, now),
        worker=worker,
        detail={"reason": reason},
    )


def is_terminal(state: JobState) -> bool:
    """Whether a job in this state will never run again by itself."""
    return state in TERMINAL_STATES
