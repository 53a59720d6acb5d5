"""Publication bookkeeping for the outbox: which jobs the broker has a message for.

`published_at` is set once the broker has a job's message and cleared whenever a new
message is needed (a promotion, a retry) or the old one is known to be lost.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job
from conveyor.jobs.states import WAITING_STATES, JobState
from conveyor.jobs.store.driver import database_now, driver_for
from conveyor.jobs.tables import jobs


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
        driver_for(session).mark_published(session, ids, now=now, wait_for_disk=wait_for_disk)


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
    now = database_now(session, now)
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
