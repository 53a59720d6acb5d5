"""Fixtures shared by the integration tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from tests.support import free_port, wait_until


@pytest.fixture
def client(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[TestClient]:
    """The API in this process over a fresh PostgreSQL database and Redis, no rate limit."""
    settings = Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    platform = build_platform(settings)
    with TestClient(create_app(platform.api_state())) as test_client:
        yield test_client
    platform.store.dispose()


@dataclass(frozen=True)
class LiveApi:
    """A running API: where it listens and a key with every scope."""

    url: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        """The request headers carrying the key."""
        return {"Authorization": f"Bearer {self.key}"}


@contextmanager
def serving(settings: Settings, engine: Engine, tenant: str) -> Iterator[LiveApi]:
    """The API served by uvicorn in a background thread, on a free loopback port."""
    platform = build_platform(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(platform.api_state()),
            host="127.0.0.1",
            port=free_port(),
            log_level="critical",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=15, what="uvicorn to start")
        with make_session_factory(engine).begin() as session:
            key, _ = keys.create_key(session, tenant=tenant, scopes=keys.SCOPES)
        yield LiveApi(url=f"http://127.0.0.1:{server.config.port}", key=key)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        platform.store.dispose()


@pytest.fixture
def live_api(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[LiveApi]:
    """The real API on a port over a fresh database and Redis, no rate limit."""
    settings = Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    with serving(settings, pg_engine, "acme") as api:
        yield api
