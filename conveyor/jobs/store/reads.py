"""Read models for the API and the command line: one job, its history, listings."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, JobEvent
from conveyor.jobs.states import TERMINAL_STATES, JobState
from conveyor.jobs.store.driver import driver_for
from conveyor.jobs.tables import job_events, jobs


def get_job(session: Session, job_id: uuid.UUID, *, tenant: str | None = None) -> Job | None:
    """The job, or None when it does not exist or belongs to another tenant."""
    statement = select(jobs).where(jobs.c.id == job_id)
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    row = session.execute(statement).mappings().first()
    return None if row is None else Job.from_row(row)


def jobs_among(
    session: Session, job_ids: list[uuid.UUID], *, terminal: bool = False
) -> dict[uuid.UUID, Job]:
    """Those of the jobs that exist (with `terminal`, that have reached a terminal state),
    by id: one query for all."""
    if not job_ids:
        return {}
    statement = select(jobs).where(jobs.c.id.in_(job_ids))
    if terminal:
        statement = statement.where(jobs.c.state.in_([s.value for s in TERMINAL_STATES]))
    return {row["id"]: Job.from_row(row) for row in session.execute(statement).mappings()}


def finished_among(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, Job]:
    """Those of the jobs that have reached a terminal state, by id (one query for all)."""
    return jobs_among(session, job_ids, terminal=True)


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
        statement = statement.where(driver_for(session).has_tag(tag))
    if before is not None:
        at, job_id = before
        statement = statement.where(
            or_(jobs.c.created_at < at, and_(jobs.c.created_at == at, jobs.c.id < job_id))
        )
    statement = statement.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    return [Job.from_row(r) for r in session.execute(statement).mappings()]
