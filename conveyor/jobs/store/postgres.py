"""The PostgreSQL driver: data-modifying CTEs, the database's clock, advisory locks.

The claim and success statements are fastpath's, the one copy that workers also run on
their own autocommit connection; many new jobs go in as one `unnest` statement.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, func, select, text
from sqlalchemy.orm import Session

from conveyor.jobs import bulk_insert
from conveyor.jobs.fastpath import CLAIM_SQL, SUCCEED_SQL, claim_params, succeed_params
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.store.writes import stamp_published
from conveyor.jobs.tables import jobs

SelectT = TypeVar("SelectT", bound=Select[Any])


def _one_row(session: Session, sql: str, params: dict[str, Any]) -> Job | None:
    row = session.connection().exec_driver_sql(sql, params).mappings().first()
    return None if row is None else Job.from_row(row)


class PostgresDriver:
    """The job store on PostgreSQL: every transition one statement with its event."""

    name = "postgresql"
    single_writer = False

    def now(self, session: Session) -> dt.datetime:
        """`now()`: the time the transaction began, one clock for every host."""
        value: dt.datetime = session.execute(select(func.now())).scalar_one()
        return value.astimezone(dt.UTC)

    def create_jobs(
        self, session: Session, new_jobs: Sequence[NewJob], *, now: dt.datetime | None
    ) -> list[Job]:
        """All the jobs and their events in one statement, timed by the database's clock."""
        return bulk_insert.insert_jobs(session, new_jobs, now=now)

    def mark_published(
        self,
        session: Session,
        job_ids: Sequence[uuid.UUID],
        *,
        now: dt.datetime | None,
        wait_for_disk: bool = False,
    ) -> None:
        """Stamp the jobs published; the commit does not wait for the disk.

        A mark lost in a crash only makes the relay publish the job again, and the
        extra delivery is dropped at claim. `wait_for_disk` leaves the commit alone, for a
        mark inside a transaction that must be durable for its other writes.
        """
        if not wait_for_disk:
            session.execute(text("SET LOCAL synchronous_commit = off"))
        stamp_published(session, job_ids, func.now() if now is None else now)

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
        """The conditional UPDATE and its event in one CTE; the lease by the database's clock."""
        params = claim_params(
            job_id, worker=worker, lease_seconds=lease_seconds, limit_key=limit_key, now=now
        )
        return _one_row(session, CLAIM_SQL, params)

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
        """The fenced UPDATE and its event in one CTE."""
        params = succeed_params(job_id, worker=worker, token=token, result=result, now=now)
        return _one_row(session, SUCCEED_SQL, params)

    def lease_expiry(self, session: Session, lease_seconds: float, now: dt.datetime | None) -> Any:
        """Without `now`, computed inside the statement by the database's clock."""
        if now is None:
            return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, float(lease_seconds))
        return now + dt.timedelta(seconds=lease_seconds)

    def try_lock(self, session: Session, key: int) -> bool:
        """An advisory lock held to the end of the transaction, if free."""
        return bool(session.execute(select(func.pg_try_advisory_xact_lock(key))).scalar_one())

    def lock(self, session: Session, key: int) -> None:
        """An advisory lock held to the end of the transaction, waiting for it."""
        session.execute(select(func.pg_advisory_xact_lock(key)))

    def has_tag(self, tag: str) -> ColumnElement[bool]:
        """JSONB containment of a one-element array."""
        return jobs.c.tags.op("@>")(func.jsonb_build_array(tag))

    def skip_locked(self, statement: SelectT) -> SelectT:
        """`FOR UPDATE SKIP LOCKED`: rows held elsewhere are left, not waited for."""
        return statement.with_for_update(skip_locked=True)
