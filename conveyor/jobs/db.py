"""Engines and sessions for the job store, tuned per database."""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.marks import DeferredMarks
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.pooling import Pooling
from conveyor.jobs.store.driver import driver_for

# A pooled connection idle this long is pinged before use.
PING_AFTER_IDLE_SECONDS = 1.0


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and immediate transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
            pool_size=pool_size,
            max_overflow=20,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # Readers never block the writer, and the API and workers share one file.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            # A workflow step cancelled by the trigger of migration 0008 cancels its own
            # dependents by the same trigger.
            cursor.execute("PRAGMA recursive_triggers=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # A deferred transaction that later writes fails at once under contention;
            # taking the write lock up front lets the busy timeout do its work.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        pool_recycle=1800,
        # A database that went away must fail calls fast, not hang them. Behind a
        # transaction pooler psycopg must not prepare what it runs often.
        connect_args={"connect_timeout": 5}
        | ({"prepare_threshold": None} if Pooling.transaction else {}),
    )
    _ping_after_idle(engine)
    return engine


def _ping_after_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only when it sat idle a while.

    A connection that died with a restarted server is found before a transaction uses
    it; one handed back moments ago is used at once, without a round trip of its own.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            # The pool drops this connection and checks out (or opens) another.
            raise DisconnectionError("the pooled connection did not answer a ping")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def db_now(session: Session) -> dt.datetime:
    """The database's current time, which decides leases, rescue, leadership and slots.

    On PostgreSQL `now()`: the time the transaction began, one clock for every host
    (a worker whose own clock runs ahead or behind cannot move a lease). SQLite runs
    inside this process, so its clock and the host's are the same one.
    """
    return driver_for(session).now(session)


class Recorder:
    """Records new jobs: the rows and their `created` events, durably, in input order.

    On PostgreSQL one prepared statement on an autocommit connection of the calling
    thread's own (no BEGIN, no COMMIT, no planning per call); elsewhere a transaction of
    the store's sessions.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        self._fast: FastPath | None = None
        if isinstance(bind, Engine) and bind.dialect.name == "postgresql":
            self._fast = FastPath(bind.url.render_as_string(hide_password=False))
        # Its writer thread's connection is closed when the thread ends, idle.
        self._later = DeferredMarks(self.mark_published, on_idle=self.close_thread)

    def record(self, new_jobs: Sequence[NewJob]) -> list[Job]:
        """Record the jobs; raises what the database raised, and then none is recorded."""
        if self._fast is not None:
            return self._fast.record(new_jobs)
        with self._sessions.begin() as session:
            return driver_for(session).create_jobs(session, new_jobs, now=None)

    def close_thread(self) -> None:
        """Close the calling thread's fast-path connections (a thread that is ending)."""
        if self._fast is not None:
            self._fast.close()

    def mark_published_soon(self, job_ids: Sequence[uuid.UUID]) -> None:
        """`mark_published` within MARK_DELAY, with the other marks made meanwhile."""
        self._later.add(job_ids)

    def mark_published(self, job_ids: Sequence[uuid.UUID]) -> None:
        """Stamp the jobs published, in a commit that does not wait for the disk.

        On PostgreSQL one statement with the ids as one array, whatever their number.
        """
        if not job_ids:
            return
        if self._fast is not None:
            self._fast.mark_published(job_ids)
            return
        from conveyor.jobs.store import mark_published

        with self._sessions.begin() as session:
            mark_published(session, job_ids)


@functools.lru_cache(maxsize=32)
def recorder_for(sessions: sessionmaker[Session]) -> Recorder:
    """The recorder of a store's sessions, one per process and sessions."""
    return Recorder(sessions)
