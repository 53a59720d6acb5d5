"""The two writes a transition is made of: a conditional UPDATE … RETURNING and its event.

Both drivers and the dialect-independent transitions build on these; nothing here
depends on which database runs the statement.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, JobError, NewJob
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import job_events, jobs


def record_event(
    session: Session,
    job: Job,
    event: str,
    from_state: str | None,
    *,
    at: dt.datetime,
    worker: str | None = None,
    detail: Any = None,
) -> None:
    """Append `event` to the job's history, moving it from `from_state` to its state now."""
    session.execute(
        insert(job_events),
        {
            "job_id": job.id,
            "at": at,
            "event": event,
            "from_state": from_state,
            "to_state": job.state.value,
            "attempt": job.attempts,
            "worker": worker,
            "detail": detail,
        },
    )


def update_job(
    session: Session,
    job_id: uuid.UUID,
    where: Sequence[Any],
    values: dict[str, Any],
) -> Job | None:
    """Write `values` to the job if `where` holds; the row as written, else None."""
    statement = update(jobs).where(jobs.c.id == job_id, *where).values(**values).returning(*jobs.c)
    row = session.execute(statement).mappings().first()
    return None if row is None else Job.from_row(row)


def held_by(worker: str, token: int) -> list[Any]:
    """The run holding lease token `token` (on `worker`) still has the job."""
    return [
        jobs.c.state == JobState.RUNNING.value,
        jobs.c.lease_token == token,
        jobs.c.worker == worker,
    ]


def unheld_values(now: dt.datetime) -> dict[str, Any]:
    """The columns of a running job handed back to the queue: no lease, a message due."""
    return {
        "state": JobState.QUEUED.value,
        "lease_expires_at": None,
        "published_at": None,
        "updated_at": now,
    }


def error_values(error: JobError) -> dict[str, Any]:
    """The error columns of a job that failed with `error`."""
    return {
        "error_type": error.type[:200],
        "error_message": error.message,
        "error_traceback": error.traceback,
        "error_fingerprint": error.fingerprint,
    }


def bury(
    session: Session,
    job_id: uuid.UUID,
    where: Sequence[Any],
    *,
    error: JobError,
    from_state: JobState,
    worker: str | None,
    now: dt.datetime,
    reason: str | None = None,
) -> Job | None:
    """→ dead with `error`, recording the `dead` event; None if `where` does not hold."""
    job = update_job(
        session,
        job_id,
        where,
        {
            "state": JobState.DEAD.value,
            "finished_at": now,
            "lease_expires_at": None,
            "updated_at": now,
            **error_values(error),
        },
    )
    if job is not None:
        detail = {"error_type": error.type}
        if reason is not None:
            detail["reason"] = reason
        record_event(session, job, "dead", from_state, at=now, worker=worker, detail=detail)
    return job


def stamp_published(session: Session, job_ids: Sequence[uuid.UUID], stamp: Any) -> None:
    """Set `published_at` to `stamp` on those of the jobs that have none."""
    session.execute(
        update(jobs)
        .where(jobs.c.id.in_(job_ids), jobs.c.published_at.is_(None))
        .values(published_at=stamp)
    )


def new_job_values(new: NewJob, now: dt.datetime) -> dict[str, Any]:
    """The row of a new job, queued (or scheduled, when it runs later) at `now`."""
    waiting = new.run_at is not None and new.run_at > now
    return {
        "id": new.id,
        "tenant": new.tenant,
        "task": new.task,
        "state": (JobState.SCHEDULED if waiting else JobState.QUEUED).value,
        "priority": new.priority,
        "queue": new.queue,
        "payload": new.payload,
        "result": None,
        "attempts": 0,
        "max_attempts": new.max_attempts,
        "timeout_seconds": new.timeout_seconds,
        "tags": list(new.tags),
        "idempotency_key": new.idempotency_key,
        "request_hash": new.request_hash,
        "cancel_requested": False,
        "created_at": now,
        "scheduled_at": new.run_at or now,
        "run_after": new.run_at if waiting else None,
        "updated_at": now,
        "schedule_id": new.schedule_id,
        "schedule_tick": new.schedule_tick,
        "traceparent": new.traceparent,
        "request_id": new.request_id,
    }


def insert_created(
    session: Session,
    rows: Sequence[dict[str, Any]],
    now: dt.datetime,
    detail: Callable[[dict[str, Any]], Any] = lambda row: None,
) -> list[Job]:
    """Insert new job rows and their `created` events (batched by SQLAlchemy when long);
    the jobs in the order given."""
    created = [
        Job.from_row(r)
        for r in session.execute(
            insert(jobs).returning(*jobs.c, sort_by_parameter_order=True), rows
        ).mappings()
    ]
    session.execute(
        insert(job_events),
        [
            {
                "job_id": row["id"],
                "at": now,
                "event": "created",
                "from_state": None,
                "to_state": row["state"],
                "attempt": 0,
                "worker": None,
                "detail": detail(row),
            }
            for row in rows
        ],
    )
    return created
