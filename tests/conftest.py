"""Fixtures for the real-service tiers: fresh databases and broker URLs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import migrate
from conveyor.jobs.db import make_engine, make_session_factory
from tests.support import require_port, temporary_pg_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database shared by the session's tests."""
    with temporary_pg_database() as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


def _truncate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE job_parents, workflows, job_events, jobs, api_keys, schedules, leases,"
                " marks, job_rollups,"
                " rate_limits, anomalies"
            )
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def store_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty job store on SQLite and on PostgreSQL in turn."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        migrate.upgrade(engine)
    else:
        engine = make_engine(request.getfixturevalue("pg_url"))
        _truncate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(store_engine: Engine) -> sessionmaker[Session]:
    """Sessions on the store under test."""
    return make_session_factory(store_engine)


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """The session's PostgreSQL database, emptied for this test."""
    engine = make_engine(pg_url)
    _truncate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def redis_url() -> str:
    """A Redis database of its own, flushed for this test."""
    require_port("Redis", "127.0.0.1", 6379)
    url = "redis://127.0.0.1:6379/7"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def amqp_url() -> str:
    """The local RabbitMQ."""
    require_port("RabbitMQ", "127.0.0.1", 5672)
    return "amqp://guest:guest@127.0.0.1:5672//"
