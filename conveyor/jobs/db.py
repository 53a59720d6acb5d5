"""Engines and sessions for the job store, tuned per database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs.store.driver import driver_for


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
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # A deferred transaction that later writes fails at once under contention;
            # taking the write lock up front lets the busy timeout do its work.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        # A ping per checkout finds connections that died with a restarted server before
        # a request uses them; the workers' hot path does not go through this pool.
        pool_pre_ping=True,
        pool_recycle=1800,
        # A database that went away must fail calls fast, not hang them.
        connect_args={"connect_timeout": 5},
    )


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
