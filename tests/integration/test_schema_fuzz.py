"""Schemathesis against the live API: every operation of /openapi.json, fuzzed over HTTP.

A real uvicorn server on a free loopback port serves the app over a fresh PostgreSQL
database and Redis; requests carry an API key with every scope. Every response must be
free of server errors and conform to the published schema (status code documented,
content type and body valid), among schemathesis' default checks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import schemathesis
import uvicorn
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema
from sqlalchemy import Engine

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from tests.support import free_port, wait_until

MAX_EXAMPLES = 25
SEED = 20240601


@dataclass
class LiveApi:
    """A running API: where it listens and a key with every scope."""

    url: str
    key: str


@pytest.fixture
def live_api(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[LiveApi]:
    """The API served by uvicorn in a background thread, on a free loopback port."""
    settings = Settings(
        database_url=pg_url, broker_url=redis_url, max_body_bytes=4096, api_rate_per_second=0
    )
    platform = build_platform(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(platform.api_state()),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=15, what="uvicorn to start")
        with make_session_factory(pg_engine).begin() as session:
            key, _ = keys.create_key(session, tenant="fuzz", scopes=keys.SCOPES)
        yield LiveApi(url=f"http://127.0.0.1:{port}", key=key)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        platform.store.dispose()


@pytest.fixture
def api_schema(live_api: LiveApi) -> OpenApiSchema:
    """The published schema, loaded over HTTP and configured for a short, reproducible run."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {live_api.key}"},
            "request-timeout": 10,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
        }
    )
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json", config=config)
    schema.config.update(base_url=live_api.url)
    return schema


if not hasattr(pytest.Item, "_nodeid"):
    # schemathesis' fixture-loaded schemas rename the running test per operation through
    # `Node._nodeid`, which pytest 9.2 replaced by a structured `_id`; give the old name back.
    from _pytest.nodeid import coerce_node_id

    def _get_nodeid(node: pytest.Item) -> str:
        return node.nodeid

    def _set_nodeid(node: pytest.Item, value: str) -> None:
        node._id = coerce_node_id(value)

    pytest.Item._nodeid = property(_get_nodeid, _set_nodeid)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_operation_conforms_to_the_schema(case: Case) -> None:
    case.call_and_validate()
