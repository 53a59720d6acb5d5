"""The store's driver: what the job store does differently on PostgreSQL and on SQLite.

Every other store module is written once against this interface. The driver is chosen
from the session's bind dialect the first time a session asks, and kept in the
session's `info` after that.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select
from sqlalchemy.orm import Session

from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.store.postgres import PostgresDriver
from conveyor.jobs.store.sqlite import SqliteDriver

SelectT = TypeVar("SelectT", bound=Select[Any])


class Driver(Protocol):
    """The operations of the job store that depend on the database."""

    name: str
    single_writer: bool
    """True when the database runs one writing transaction at a time (SQLite)."""

    def now(self, session: Session) -> dt.datetime:
        """The database's current time, which decides leases, rescue and leadership."""
        ...

    def create_jobs(
        self, session: Session, new_jobs: Sequence[NewJob], *, now: dt.datetime | None
    ) -> list[Job]:
        """Insert the jobs and their `created` events; the rows in input order."""
        ...

    def mark_published(
        self,
        session: Session,
        job_ids: Sequence[uuid.UUID],
        *,
        now: dt.datetime | None,
        wait_for_disk: bool = False,
    ) -> None:
        """Stamp `published_at` on those of the jobs that have none.

        The commit need not wait for the disk, unless `wait_for_disk`.
        """
        ...

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
        """queued → running with the next lease token, and its `claimed` event."""
        ...

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
        """running → succeeded for the run holding `token`, and its `succeeded` event."""
        ...

    def lease_expiry(self, session: Session, lease_seconds: float, now: dt.datetime | None) -> Any:
        """The value (or SQL expression) of a lease that ends `lease_seconds` from now."""
        ...

    def try_lock(self, session: Session, key: int) -> bool:
        """Take the transaction-scoped lock `key` if free; False when another holds it."""
        ...

    def lock(self, session: Session, key: int) -> None:
        """Take the transaction-scoped lock `key`, waiting for it."""
        ...

    def has_tag(self, tag: str) -> ColumnElement[bool]:
        """A condition on the jobs table: the job carries `tag`."""
        ...

    def skip_locked(self, statement: SelectT) -> SelectT:
        """`statement`, passing over rows that another transaction has locked."""
        ...


_DRIVERS: dict[str, Driver] = {"postgresql": PostgresDriver(), "sqlite": SqliteDriver()}
_INFO_KEY = "conveyor.store.driver"


def driver_for(session: Session) -> Driver:
    """The driver for the session's database, looked up once per session."""
    found: Driver | None = session.info.get(_INFO_KEY)
    if found is None:
        dialect = session.get_bind().dialect.name
        try:
            found = _DRIVERS[dialect]
        except KeyError:
            raise RuntimeError(f"the job store has no driver for {dialect!r}") from None
        session.info[_INFO_KEY] = found
    return found


def database_now(session: Session, now: dt.datetime | None = None) -> dt.datetime:
    """`now` when the caller fixes the time, else the database's current time."""
    return now or driver_for(session).now(session)
