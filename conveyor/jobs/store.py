"""The job store: one function per state transition, each a conditional UPDATE.

Every function takes the caller's session and never commits: the caller owns the
transaction. A transition that finds the row in a state it may not leave returns
None and writes nothing; the caller decides what that means.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Select,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from conveyor.jobs import bulk_insert
from conveyor.jobs.db import db_now, is_postgres
from conveyor.jobs.fastpath import CLAIM_SQL, SUCCEED_SQL, claim_params, succeed_params
from conveyor.jobs.models import Job, JobError, JobEvent, NewJob
from conveyor.jobs.states import (
    CANCELLABLE_STATES,
    REQUEUEABLE_STATES,
    TERMINAL_STATES,
    WAITING_STATES,
    JobState,
)
from conveyor.jobs.tables import job_events, jobs


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def _event(
    session: Session,
    job: Job,
    event: str,
    from_state: str | None,
    *,
    at: dt.datetime,
    worker: str | None = None,
    detail: Any = None,
) -> None:
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


def _transition(
    session: Session,
    job_id: uuid.UUID,
    where: Sequence[Any],
    values: dict[str, Any],
) -> Job | None:
    statement = update(jobs).where(jobs.c.id == job_id, *where).values(**values).returning(*jobs.c)
    row = session.execute(statement).mappings().first()
    return None if row is None else Job.from_row(row)


def _bury(
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
    job = _transition(
        session,
        job_id,
        where,
        {
            "state": JobState.DEAD.value,
            "finished_at": now,
            "lease_expires_at": None,
            "updated_at": now,
            **_error_values(error),
        },
    )
    if job is not None:
        detail = {"error_type": error.type}
        if reason is not None:
            detail["reason"] = reason
        _event(session, job, "dead", from_state, at=now, worker=worker, detail=detail)
    return job


def _new_job_values(new: NewJob, now: dt.datetime) -> dict[str, Any]:
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


def create_jobs(
    session: Session, new_jobs: Sequence[NewJob], *, now: dt.datetime | None = None
) -> list[Job]:
    """Record new jobs (queued, or scheduled when their run time is ahead), in order."""
    if not new_jobs:
        return []
    if is_postgres(session):
        return bulk_insert.insert_jobs(session, new_jobs, now=now)
    now = now or db_now(session)
    rows = [_new_job_values(new, now) for new in new_jobs]
    # SQLite: one statement (batched by SQLAlchemy when long) returns the rows in order.
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
                "detail": None,
            }
            for row in rows
        ],
    )
    return created


def create_job(session: Session, new: NewJob, *, now: dt.datetime | None = None) -> Job:
    """Record one new job."""
    return create_jobs(session, [new], now=now)[0]


def mark_published(
    session: Session,
    job_ids: Iterable[uuid.UUID],
    *,
    now: dt.datetime | None = None,
    wait_for_disk: bool = False,
) -> None:
    """Note that the broker has the messages of these jobs (the outbox is drained).

    On PostgreSQL this commit does not wait for the disk: a mark lost in a crash only
    makes the relay publish the job again, and the extra delivery is dropped at claim.
    `wait_for_disk` leaves the transaction's commit as it is, for a mark made inside a
    transaction that must be durable for other reasons.
    """
    ids = list(job_ids)
    if ids:
        if is_postgres(session) and not wait_for_disk:
            session.execute(text("SET LOCAL synchronous_commit = off"))
        stamp: Any = now
        if stamp is None:
            stamp = func.now() if is_postgres(session) else utcnow()
        session.execute(
            update(jobs)
            .where(jobs.c.id.in_(ids), jobs.c.published_at.is_(None))
            .values(published_at=stamp)
        )


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
    values: dict[str, Any] = {
        "state": JobState.RUNNING.value,
        "attempts": jobs.c.attempts + 1,
        "lease_token": jobs.c.lease_token + 1,
        "worker": worker,
    }
    if limit_key is not None:
        values["limit_key"] = limit_key
    if is_postgres(session):
        # One statement: the conditional UPDATE and its event in one CTE (fastpath's SQL).
        row = (
            session.connection()
            .exec_driver_sql(
                CLAIM_SQL,
                claim_params(
                    job_id, worker=worker, lease_seconds=lease_seconds, limit_key=limit_key, now=now
                ),
            )
            .mappings()
            .first()
        )
        return None if row is None else Job.from_row(row)
    now = now or db_now(session)
    values.update(
        lease_expires_at=now + dt.timedelta(seconds=lease_seconds), started_at=now, updated_at=now
    )
    job = _transition(
        session,
        job_id,
        [jobs.c.state == JobState.QUEUED.value, jobs.c.attempts < jobs.c.max_attempts],
        values,
    )
    if job is not None:
        _event(session, job, "claimed", JobState.QUEUED, at=now, worker=worker)
    return job


def promote(session: Session, job_id: uuid.UUID, *, now: dt.datetime | None = None) -> Job | None:
    """scheduled or retrying → queued once its due time has come."""
    now = now or db_now(session)
    before = get_job(session, job_id)
    if before is None:
        return None
    job = _transition(
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
        _event(session, job, "promoted", before.state, at=now)
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
    if is_postgres(session):
        row = (
            session.connection()
            .exec_driver_sql(
                SUCCEED_SQL,
                succeed_params(job_id, worker=worker, token=token, result=result, now=now),
            )
            .mappings()
            .first()
        )
        return None if row is None else Job.from_row(row)
    now = now or db_now(session)
    job = _transition(
        session,
        job_id,
        _held_by(worker, token),
        {
            "state": JobState.SUCCEEDED.value,
            "result": result,
            "finished_at": now,
            "lease_expires_at": None,
            "updated_at": now,
        },
    )
    if job is not None:
        _event(session, job, "succeeded", JobState.RUNNING, at=now, worker=worker)
    return job


def _held_by(worker: str, token: int) -> list[Any]:
    """The run holding lease token `token` (on `worker`) still has the job."""
    return [
        jobs.c.state == JobState.RUNNING.value,
        jobs.c.lease_token == token,
        jobs.c.worker == worker,
    ]


def _error_values(error: JobError) -> dict[str, Any]:
    return {
        "error_type": error.type[:200],
        "error_message": error.message,
        "error_traceback": error.traceback,
        "error_fingerprint": error.fingerprint,
    }


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
    now = now or db_now(session)
    run_after = now + dt.timedelta(seconds=delay_seconds)
    job = _transition(
        session,
        job_id,
        [*_held_by(worker, token), jobs.c.attempts < jobs.c.max_attempts],
        {
            "state": JobState.RETRYING.value,
            "run_after": run_after,
            "published_at": None,
            "lease_expires_at": None,
            "updated_at": now,
            **_error_values(error),
        },
    )
    if job is not None:
        delay = (run_after - now).total_seconds()
        _event(
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
    return _bury(
        session,
        job_id,
        _held_by(worker, token),
        error=error,
        from_state=JobState.RUNNING,
        worker=worker,
        now=now or db_now(session),
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
    return _bury(
        session,
        job_id,
        [jobs.c.state == JobState.QUEUED.value, jobs.c.attempts >= jobs.c.max_attempts],
        error=error,
        from_state=JobState.QUEUED,
        worker=worker,
        now=now or db_now(session),
    )


def cancel(
    session: Session,
    job_id: uuid.UUID,
    *,
    tenant: str | None = None,
    now: dt.datetime | None = None,
) -> Job | None:
    """Any non-terminal state → cancelled; a running job's worker sees it and stops.

    None only when the job is missing or already finished: a cancel that races another
    transition (a claim, a promotion) reads the row again and cancels its new state.
    """
    now = now or db_now(session)
    for _ in range(10):
        before = get_job(session, job_id, tenant=tenant)
        if before is None or before.state not in CANCELLABLE_STATES:
            return None
        # The lease is left as it is: a running job's becomes its run's stop window, and
        # a retry still waiting for a cancelled run to stop keeps that run's window.
        values: dict[str, Any] = {
            "state": JobState.CANCELLED.value,
            "cancel_requested": True,
            "finished_at": now,
            "run_after": None,
            "updated_at": now,
        }
        job = _transition(
            session,
            job_id,
            [jobs.c.state == before.state.value, jobs.c.lease_token == before.lease_token],
            values,
        )
        if job is not None:
            _event(session, job, "cancelled", before.state, at=now, worker=before.worker)
            return job
    raise RuntimeError(f"job {job_id} kept changing while being cancelled")


def requeue(
    session: Session,
    job_id: uuid.UUID,
    *,
    tenant: str | None = None,
    now: dt.datetime | None = None,
) -> Job | None:
    """dead or cancelled → queued under the same id, with its attempts counted afresh.

    The lease token is kept, so the next claim takes a token no earlier run held. A job
    cancelled while running whose run may still be stopping (its lease has not lapsed
    and the run has not reported that it stopped) waits `scheduled` until that lease
    ends: two runs of one job never overlap.
    """
    now = now or db_now(session)
    before = get_job(session, job_id, tenant=tenant)
    if before is None or before.state not in REQUEUEABLE_STATES:
        return None
    stopping = before.lease_expires_at is not None and before.lease_expires_at > now
    values: dict[str, Any] = {
        "state": (JobState.SCHEDULED if stopping else JobState.QUEUED).value,
        "attempts": 0,
        "finished_at": None,
        "cancel_requested": False,
        "worker": None,
        "published_at": None,
        "run_after": before.lease_expires_at if stopping else None,
        "updated_at": now,
    }
    if not stopping:
        values["lease_expires_at"] = None
    job = _transition(
        session,
        job_id,
        [jobs.c.state == before.state.value, jobs.c.lease_token == before.lease_token],
        values,
    )
    if job is not None:
        detail = {"waits_for_run_to_stop": True} if stopping else None
        _event(session, job, "requeued", before.state, at=now, detail=detail)
    return job


def stopped(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    token: int,
    now: dt.datetime | None = None,
) -> Job | None:
    """A run that was taken away has stopped: end its stop window.

    A retry waiting for this run (see `requeue`) becomes due at once. None when the job
    has moved on (a newer run holds it) or the run's lease had already ended.
    """
    now = now or db_now(session)
    job = _transition(
        session,
        job_id,
        [
            jobs.c.lease_token == token,
            jobs.c.state != JobState.RUNNING.value,
            jobs.c.lease_expires_at.is_not(None),
        ],
        {"lease_expires_at": None},
    )
    if job is None:
        return None
    if job.state == JobState.SCHEDULED and job.run_after is not None and job.run_after > now:
        job = (
            _transition(
                session,
                job_id,
                [jobs.c.state == JobState.SCHEDULED.value, jobs.c.lease_token == token],
                {"run_after": now, "published_at": None, "updated_at": now},
            )
            or job
        )
    _event(session, job, "stopped", job.state, at=now, worker=worker)
    return job


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
    now = now or db_now(session)
    job = _transition(
        session,
        job_id,
        _held_by(worker, token),
        {
            "state": JobState.QUEUED.value,
            "lease_expires_at": None,
            "published_at": None,
            "updated_at": now,
        },
    )
    if job is not None:
        _event(
            session,
            job,
            "released",
            JobState.RUNNING,
            at=now,
            worker=worker,
            detail={"reason": reason},
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
    _event(
        session,
        job,
        "delivery_dropped",
        job.state,
        at=now or db_now(session),
        worker=worker,
        detail={"reason": reason},
    )


def get_job(session: Session, job_id: uuid.UUID, *, tenant: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another tenant."""
    statement = select(jobs).where(jobs.c.id == job_id)
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    row = session.execute(statement).mappings().first()
    return None if row is None else Job.from_row(row)


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    """The tenant's job recorded under this idempotency key, if any."""
    statement = select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)
    row = session.execute(statement).mappings().first()
    return None if row is None else Job.from_row(row)


def list_events(session: Session, job_id: uuid.UUID) -> list[JobEvent]:
    """A job's history, oldest first."""
    statement = select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
    return [JobEvent.from_row(r) for r in session.execute(statement).mappings()]


def list_jobs(
    session: Session,
    *,
    tenant: str | None = None,
    state: JobState | None = None,
    limit: int = 50,
) -> list[Job]:
    """Jobs newest first, optionally of one tenant and state."""
    statement: Select[Any] = select(jobs)
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    if state is not None:
        statement = statement.where(jobs.c.state == state.value)
    statement = statement.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    return [Job.from_row(r) for r in session.execute(statement).mappings()]


def due_for_publish(
    session: Session,
    *,
    cutoff: dt.datetime,
    now: dt.datetime | None = None,
    limit: int = 500,
) -> list[Job]:
    """Jobs whose message may be missing from the broker.

    Queued jobs never published by `cutoff`; waiting jobs that are due and were never
    published with a countdown; and waiting jobs overdue past `cutoff` whatever the
    broker was told, since their delayed message may have been lost.
    """
    now = now or db_now(session)
    waiting = jobs.c.state.in_([s.value for s in WAITING_STATES])
    statement = (
        select(jobs)
        .where(
            or_(
                and_(
                    jobs.c.state == JobState.QUEUED.value,
                    jobs.c.published_at.is_(None),
                    jobs.c.updated_at < cutoff,
                ),
                and_(waiting, jobs.c.run_after <= now, jobs.c.published_at.is_(None)),
                and_(waiting, jobs.c.run_after <= cutoff),
            )
        )
        .order_by(jobs.c.updated_at)
        .limit(limit)
    )
    return [Job.from_row(r) for r in session.execute(statement).mappings()]


def is_terminal(state: JobState) -> bool:
    """Whether a job in this state will never run again by itself."""
    return state in TERMINAL_STATES


def _lease_expiry(session: Session, lease_seconds: float, now: dt.datetime | None) -> Any:
    """When a lease renewed now ends: on PostgreSQL inside the statement, by its clock."""
    if is_postgres(session) and now is None:
        return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, float(lease_seconds))
    return (now or db_now(session)) + dt.timedelta(seconds=lease_seconds)


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
        .values(lease_expires_at=_lease_expiry(session, lease_seconds, now))
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
        .values(lease_expires_at=_lease_expiry(session, lease_seconds, now))
    )


def rescue(
    session: Session,
    job_id: uuid.UUID,
    *,
    now: dt.datetime | None = None,
) -> Job | None:
    """running with an expired lease → queued, or → dead when no attempts are left."""
    now = now or db_now(session)
    expired = [jobs.c.state == JobState.RUNNING.value, jobs.c.lease_expires_at < now]
    before = get_job(session, job_id)
    if before is None:
        return None
    lost = JobError(
        "WorkerLost",
        "the attempt's worker stopped renewing its lease (killed, hard time limit, or lost)",
    )
    job = _transition(
        session,
        job_id,
        [*expired, jobs.c.attempts < jobs.c.max_attempts],
        {
            "state": JobState.QUEUED.value,
            "lease_expires_at": None,
            "published_at": None,
            "updated_at": now,
            **_error_values(lost),
        },
    )
    if job is not None:
        _event(
            session,
            job,
            "rescued",
            JobState.RUNNING,
            at=now,
            worker=before.worker,
            detail={"reason": "lease expired"},
        )
        return job
    return _bury(
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
            jobs.c.lease_expires_at < (now or db_now(session)),
        )
        .limit(limit)
    )
    return list(session.execute(statement).scalars())


def list_dead(
    session: Session,
    *,
    tenant: str | None,
    task: str | None = None,
    error_type: str | None = None,
    limit: int = 100,
) -> list[Job]:
    """Dead jobs, most recently dead first, optionally of one task type and error type."""
    statement: Select[Any] = select(jobs).where(jobs.c.state == JobState.DEAD.value)
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    if task is not None:
        statement = statement.where(jobs.c.task == task)
    if error_type is not None:
        statement = statement.where(jobs.c.error_type == error_type)
    statement = statement.order_by(jobs.c.finished_at.desc(), jobs.c.id.desc()).limit(limit)
    return [Job.from_row(r) for r in session.execute(statement).mappings()]


def dead_groups(session: Session, *, tenant: str | None) -> list[tuple[str, str, str, int]]:
    """Dead jobs counted by task, error type and error fingerprint, largest group first."""
    count = func.count().label("n")
    statement = select(jobs.c.task, jobs.c.error_type, jobs.c.error_fingerprint, count).where(
        jobs.c.state == JobState.DEAD.value
    )
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    statement = statement.group_by(
        jobs.c.task, jobs.c.error_type, jobs.c.error_fingerprint
    ).order_by(count.desc())
    return [(t, e or "", f or "", int(n)) for t, e, f, n in session.execute(statement).all()]


def delete_dead(session: Session, job_id: uuid.UUID, *, tenant: str | None) -> bool:
    """Remove a dead job for good, its history with it; False if it is not a dead job."""
    statement = delete(jobs).where(jobs.c.id == job_id, jobs.c.state == JobState.DEAD.value)
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    return session.execute(statement.returning(jobs.c.id)).first() is not None


def forget_publications(session: Session) -> int:
    """Mark every queued job unpublished, after the broker lost its messages."""
    result = session.execute(
        update(jobs)
        .where(jobs.c.state == JobState.QUEUED.value, jobs.c.published_at.is_not(None))
        .values(published_at=None)
        .returning(jobs.c.id)
    )
    return len(result.all())


def forget_publication(session: Session, job_id: uuid.UUID) -> None:
    """Mark one queued job unpublished: its message is known to be gone."""
    session.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
        .values(published_at=None)
    )


def forget_stale_publications(
    session: Session, *, queue: str, published_before: dt.datetime
) -> int:
    """Mark queued jobs of `queue` unpublished when their message is long gone from it.

    Called when the broker's queue is empty although jobs of it are still queued: their
    messages were lost (deleted queue, unroutable publish), so they are published again.
    A message that was merely reserved by a busy worker becomes a duplicate that the
    claim drops.
    """
    result = session.execute(
        update(jobs)
        .where(
            jobs.c.state == JobState.QUEUED.value,
            jobs.c.queue == queue,
            jobs.c.published_at < published_before,
        )
        .values(published_at=None)
        .returning(jobs.c.id)
    )
    return len(result.all())


def forget_overtaken_publications(session: Session, *, queue: str, grace_seconds: float) -> int:
    """Mark unpublished the queued jobs of `queue` that later-published jobs overtook.

    A queue hands out its messages in order, so a job still queued although a job
    published more than `grace_seconds` after it is already running had its message
    lost. Works with a backlog in the queue, where an empty-queue check cannot.
    """
    front = session.execute(
        select(func.max(jobs.c.published_at)).where(
            jobs.c.queue == queue, jobs.c.state == JobState.RUNNING.value
        )
    ).scalar_one_or_none()
    if front is None:
        return 0
    if front.tzinfo is None:
        front = front.replace(tzinfo=dt.UTC)
    return forget_stale_publications(
        session, queue=queue, published_before=front - dt.timedelta(seconds=grace_seconds)
    )


def lock_idempotency_key(session: Session, tenant: str, key: str) -> bool:
    """Take the transaction's lock on a tenant's idempotency key; False if another holds it.

    On PostgreSQL an advisory lock held to the end of the transaction; SQLite runs one
    writing transaction at a time, so there the lock is always had.
    """
    if not is_postgres(session):
        return True
    digest = hashlib.sha256(f"{tenant}\x00{key}".encode()).digest()
    lock_id = int.from_bytes(digest[:8], "big", signed=True)
    return bool(session.execute(select(func.pg_try_advisory_xact_lock(lock_id))).scalar_one())


def list_jobs_page(
    session: Session,
    *,
    tenant: str,
    state: JobState | None = None,
    task: str | None = None,
    tag: str | None = None,
    limit: int = 50,
    before: tuple[dt.datetime, uuid.UUID] | None = None,
) -> list[Job]:
    """A tenant's jobs newest first, strictly after the (created_at, id) position `before`."""
    statement: Select[Any] = select(jobs).where(jobs.c.tenant == tenant)
    if state is not None:
        statement = statement.where(jobs.c.state == state.value)
    if task is not None:
        statement = statement.where(jobs.c.task == task)
    if tag is not None:
        if is_postgres(session):
            statement = statement.where(jobs.c.tags.op("@>")(func.jsonb_build_array(tag)))
        else:
            each = func.json_each(jobs.c.tags).table_valued("value")
            statement = statement.where(select(each.c.value).where(each.c.value == tag).exists())
    if before is not None:
        at, job_id = before
        statement = statement.where(
            or_(jobs.c.created_at < at, and_(jobs.c.created_at == at, jobs.c.id < job_id))
        )
    statement = statement.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    return [Job.from_row(r) for r in session.execute(statement).mappings()]


def counts_by_queue(session: Session, *, tenant: str | None = None) -> dict[str, dict[str, int]]:
    """Unfinished jobs per queue and state."""
    statement = (
        select(jobs.c.queue, jobs.c.state, func.count())
        .where(jobs.c.state.notin_([s.value for s in TERMINAL_STATES]))
        .group_by(jobs.c.queue, jobs.c.state)
    )
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    counts: dict[str, dict[str, int]] = {}
    for queue, state, count in session.execute(statement).all():
        counts.setdefault(queue, {})[state] = int(count)
    limited = select(jobs.c.queue, func.count()).where(
        jobs.c.state == JobState.SCHEDULED.value, jobs.c.slot_at.is_not(None)
    )
    if tenant is not None:
        limited = limited.where(jobs.c.tenant == tenant)
    for queue, count in session.execute(limited.group_by(jobs.c.queue)).all():
        counts.setdefault(queue, {})["rate_limited"] = int(count)
    return counts


def dead_counts_by_task(session: Session) -> dict[str, int]:
    """Dead jobs kept in the store, per task type (every tenant)."""
    statement = (
        select(jobs.c.task, func.count())
        .where(jobs.c.state == JobState.DEAD.value)
        .group_by(jobs.c.task)
    )
    return {task: int(count) for task, count in session.execute(statement).all()}


def oldest_queued_by_queue(session: Session) -> dict[str, dt.datetime]:
    """When the oldest queued job of each queue became due."""
    due = func.coalesce(jobs.c.scheduled_at, jobs.c.created_at)
    statement = (
        select(jobs.c.queue, func.min(due))
        .where(jobs.c.state == JobState.QUEUED.value)
        .group_by(jobs.c.queue)
    )
    found = {}
    for queue, at in session.execute(statement).all():
        if at is not None:
            found[queue] = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
    return found


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
    now = now or db_now(session)
    values: dict[str, Any] = {
        "state": JobState.SCHEDULED.value,
        "run_after": run_after,
        "published_at": None,
        "updated_at": now,
        "slot_at": slot_at,
    }
    job = _transition(session, job_id, [jobs.c.state == JobState.QUEUED.value], values)
    if job is not None:
        _event(
            session,
            job,
            "deferred",
            JobState.QUEUED,
            at=now,
            detail={"reason": reason, "until": run_after.isoformat()},
        )
    return job


def lock_limit_key(session: Session, name: str) -> None:
    """Serialize claims counted against one concurrency key (PostgreSQL; SQLite is serial)."""
    if not is_postgres(session):
        return
    digest = hashlib.sha256(name.encode()).digest()
    session.execute(
        select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True)))
    )


def count_running(session: Session, *, task: str, limit_key: str) -> int:
    """Running jobs of a task type holding a concurrency key."""
    statement = select(func.count()).where(
        jobs.c.task == task,
        jobs.c.limit_key == limit_key,
        jobs.c.state == JobState.RUNNING.value,
    )
    return int(session.execute(statement).scalar_one())
