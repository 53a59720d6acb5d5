"""Leases of running jobs: renewal, the stop windows of taken runs, and rescue.

Without a fixed `now`, a new expiry is the database's clock plus the lease, computed
inside the statement on PostgreSQL: a worker's own clock never moves a lease.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, JobError
from conveyor.jobs.states import JobState
from conveyor.jobs.store.driver import database_now, driver_for
from conveyor.jobs.store.reads import get_job
from conveyor.jobs.store.writes import (
    bury,
    error_values,
    record_event,
    unheld_values,
    update_job,
)
from conveyor.jobs.tables import jobs


def renew_leases(
    session: Session,
    held: Sequence[tuple[uuid.UUID, int]],
    *,
    lease_seconds: float,
    now: dt.datetime | None = None,
) -> set[tuple[uuid.UUID, int]]:
    """Extend the leases of running jobs held under these (id, lease token) pairs.

    Returns the pairs still held. A pair missing from the answer was cancelled, rescued
    or finished elsewhere, or a newer run holds the job: the run holding it must stop.
    On PostgreSQL the new expiry is the database's clock plus `lease_seconds`.
    """
    if not held:
        return set()
    rows = session.execute(
        update(jobs)
        .where(
            tuple_(jobs.c.id, jobs.c.lease_token).in_([(i, t) for i, t in held]),
            jobs.c.state == JobState.RUNNING.value,
        )
        .values(lease_expires_at=driver_for(session).lease_expiry(session, lease_seconds, now))
        .returning(jobs.c.id, jobs.c.lease_token)
    ).all()
    return {(job_id, int(token)) for job_id, token in rows}


def extend_stop_windows(
    session: Session,
    stopping: Sequence[tuple[uuid.UUID, int]],
    *,
    lease_seconds: float,
    now: dt.datetime | None = None,
) -> None:
    """Keep the stop window of runs that were taken away but are still alive.

    A cancelled run that has not stopped yet (a call it cannot leave early) holds the
    job's lease for as long as its process keeps renewing it, so a retry waits for it;
    if the process dies, the window ends with the lease.
    """
    if not stopping:
        return
    session.execute(
        update(jobs)
        .where(
            tuple_(jobs.c.id, jobs.c.lease_token).in_([(i, t) for i, t in stopping]),
            jobs.c.state != JobState.RUNNING.value,
            jobs.c.lease_expires_at.is_not(None),
        )
        .values(lease_expires_at=driver_for(session).lease_expiry(session, lease_seconds, now))
    )


def rescue(
    session: Session,
    job_id: uuid.UUID,
    *,
    now: dt.datetime | None = None,
) -> Job | None:
    """running with an expired lease → queued, or → dead when no attempts are left."""
    now = database_now(session, now)
    expired = [jobs.c.state == JobState.RUNNING.value, jobs.c.lease_expires_at < now]
    before = get_job(session, job_id)
    if before is None:
        return None
    lost = JobError(
        "WorkerLost",
        "the attempt's worker stopped renewing its lease (killed, hard time limit, or lost)",
    )
    job = update_job(
        session,
        job_id,
        [*expired, jobs.c.attempts < jobs.c.max_attempts],
        {**unheld_values(now), **error_values(lost)},
    )
    if job is not None:
        record_event(
            session,
            job,
            "rescued",
            JobState.RUNNING,
            at=now,
            worker=before.worker,
            detail={"reason": "lease expired"},
        )
        return job
    return bury(
        session,
        job_id,
        [*expired, jobs.c.attempts >= jobs.c.max_attempts],
        error=lost,
        from_state=JobState.RUNNING,
        worker=before.worker,
        now=now,
        reason="lease expired",
    )


def expired_leases(
    session: Session, *, now: dt.datetime | None = None, limit: int = 500
) -> list[uuid.UUID]:
    """Running jobs whose worker stopped renewing its lease."""
    statement = (
        select(jobs.c.id)
        .where(
            jobs.c.state == JobState.RUNNING.value,
            jobs.c.lease_expires_at < (database_now(session, now)),
        )
        .limit(limit)
    )
    return list(session.execute(statement).scalars())
