"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings


@pytest.fixture
def client(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[TestClient]:
    """The API in this process over a fresh PostgreSQL database and Redis, no rate limit."""
    settings = Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    platform = build_platform(settings)
    with TestClient(create_app(platform.api_state())) as test_client:
        yield test_client
    platform.store.dispose()
