"""The dead-letter queue: dead jobs listed, grouped by cause, and deleted for good."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import jobs


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
