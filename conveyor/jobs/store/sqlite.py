"""The SQLite driver: the same transitions as ORM statements, run one by one.

SQLite runs inside this process and its transactions here begin IMMEDIATE, one writer
at a time: the host's clock is the database's, and every lock is already held.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.states import JobState
from conveyor.jobs.store.writes import (
    held_by,
    insert_created,
    new_job_values,
    record_event,
    stamp_published,
    update_job,
)
from conveyor.jobs.tables import jobs

SelectT = TypeVar("SelectT", bound=Select[Any])


class SqliteDriver:
    """The job store on SQLite: an UPDATE … RETURNING, then its event, per transition."""

    name = "sqlite"
    single_writer = True

    def now(self, session: Session) -> dt.datetime:
        """The host's clock, which is SQLite's: it runs inside this process."""
        return dt.datetime.now(dt.UTC)

    def create_jobs(
        self, session: Session, new_jobs: Sequence[NewJob], *, now: dt.datetime | None
    ) -> list[Job]:
        """One INSERT … RETURNING (batched by SQLAlchemy when long), then the events."""
        now = now or self.now(session)
        rows = [new_job_values(new, now) for new in new_jobs]
        return insert_created(session, rows, now)

    def mark_published(
        self,
        session: Session,
        job_ids: Sequence[uuid.UUID],
        *,
        now: dt.datetime | None,
        wait_for_disk: bool = False,
    ) -> None:
        """Stamp the jobs published at `now`, or at the host's time."""
        stamp_published(session, job_ids, now or self.now(session))

    def claim(
        self,
        session: Session,
        job_id: uuid.UUID,
        *,
        worker: str,
        lease_seconds: float,
        now: dt.datetime | None,
        limit_key: str | None,
    ) -> Job | None:
        """The conditional UPDATE, then the `claimed` event."""
        now = now or self.now(session)
        values: dict[str, Any] = {
            "state": JobState.RUNNING.value,
            "attempts": jobs.c.attempts + 1,
            "lease_token": jobs.c.lease_token + 1,
            "worker": worker,
            "lease_expires_at": now + dt.timedelta(seconds=lease_seconds),
            "started_at": now,
            "updated_at": now,
        }
        if limit_key is not None:
            values["limit_key"] = limit_key
        job = update_job(
            session,
            job_id,
            [jobs.c.state == JobState.QUEUED.value, jobs.c.attempts < jobs.c.max_attempts],
            values,
        )
        if job is not None:
            record_event(session, job, "claimed", JobState.QUEUED, at=now, worker=worker)
        return job

    def succeed(
        self,
        session: Session,
        job_id: uuid.UUID,
        *,
        worker: str,
        token: int,
        result: Any,
        now: dt.datetime | None,
    ) -> Job | None:
        """The fenced UPDATE, then the `succeeded` event."""
        now = now or self.now(session)
        job = update_job(
            session,
            job_id,
            held_by(worker, token),
            {
                "state": JobState.SUCCEEDED.value,
                "result": result,
                "finished_at": now,
                "lease_expires_at": None,
                "updated_at": now,
            },
        )
        if job is not None:
            record_event(session, job, "succeeded", JobState.RUNNING, at=now, worker=worker)
        return job

    def lease_expiry(self, session: Session, lease_seconds: float, now: dt.datetime | None) -> Any:
        """`now` (or the host's time) plus the lease."""
        return (now or self.now(session)) + dt.timedelta(seconds=lease_seconds)

    def try_lock(self, session: Session, key: int) -> bool:
        """Always had: the transaction already holds SQLite's one write lock."""
        return True

    def lock(self, session: Session, key: int) -> None:
        """Nothing to wait for: the transaction already holds SQLite's one write lock."""

    def has_tag(self, tag: str) -> ColumnElement[bool]:
        """One of the JSON array's elements is `tag`."""
        each = func.json_each(jobs.c.tags).table_valued("value")
        return select(each.c.value).where(each.c.value == tag).exists()

    def skip_locked(self, statement: SelectT) -> SelectT:
        """Unchanged: no other transaction can hold a row while this one runs."""
        return statement
