"""Gauge queries: how many jobs are where, for metrics, queues and flow control."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from conveyor.jobs.states import TERMINAL_STATES, JobState
from conveyor.jobs.tables import jobs


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


def oldest_queued_by_queue(
    session: Session, *, tenant: str | None = None
) -> dict[str, dt.datetime]:
    """When the oldest queued job of each queue (of one tenant, or all) became due."""
    due = func.coalesce(jobs.c.scheduled_at, jobs.c.created_at)
    statement = (
        select(jobs.c.queue, func.min(due))
        .where(jobs.c.state == JobState.QUEUED.value)
        .group_by(jobs.c.queue)
    )
    if tenant is not None:
        statement = statement.where(jobs.c.tenant == tenant)
    found = {}
    for queue, at in session.execute(statement).all():
        if at is not None:
            found[queue] = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
    return found


def count_running(session: Session, *, task: str, limit_key: str) -> int:
    """Running jobs of a task type holding a concurrency key."""
    statement = select(func.count()).where(
        jobs.c.task == task,
        jobs.c.limit_key == limit_key,
        jobs.c.state == JobState.RUNNING.value,
    )
    return int(session.execute(statement).scalar_one())


def finished_since(session: Session, since: dt.datetime) -> dict[str, int]:
    """Jobs of every tenant that reached each terminal state since `since`."""
    statement = (
        select(jobs.c.state, func.count()).where(jobs.c.finished_at >= since).group_by(jobs.c.state)
    )
    return {state: int(count) for state, count in session.execute(statement).all()}
