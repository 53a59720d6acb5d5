"""Engines and sessions for the job store, tuned per database."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


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


def is_postgres(session: Session) -> bool:
    """Whether the session's database is PostgreSQL (else SQLite)."""
    return session.get_bind().dialect.name == "postgresql"


def try_transaction_lock(session: Session, key: int) -> bool:
    """Take the transaction-scoped lock `key` if free; False when another holds it.

    On PostgreSQL an advisory lock; SQLite transactions here begin IMMEDIATE and so
    already run one at a time.
    """
    if not is_postgres(session):
        return True
    return bool(session.execute(select(func.pg_try_advisory_xact_lock(key))).scalar_one())


def db_now(session: Session) -> dt.datetime:
    """The database's current time, which decides leases, rescue, leadership and slots.

    On PostgreSQL `now()`: the time the transaction began, one clock for every host
    (a worker whose own clock runs ahead or behind cannot move a lease). SQLite runs
    inside this process, so its clock and the host's are the same one.
    """
    if not is_postgres(session):
        return dt.datetime.now(dt.UTC)
    value: dt.datetime = session.execute(select(func.now())).scalar_one()
    return value.astimezone(dt.UTC)
