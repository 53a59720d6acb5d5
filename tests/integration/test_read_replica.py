"""CONVEYOR_DATABASE_READ_URL against a real streaming replica (tests/replication.py):
listings, stats, the console and waits read the replica; what decides writes the
primary; a job just submitted is found while the replica lags; a replica that goes away
leaves reads to the primary, and /readyz says so."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, migrate
from conveyor.jobs.db import make_engine, make_session_factory
from tests.acceptance.cluster import report
from tests.replication import Replicated, primary_and_replica
from tests.support import wait_until


@pytest.fixture
def pair() -> Iterator[Replicated]:
    with primary_and_replica() as found:
        yield found


@pytest.fixture
def primary_engine(pair: Replicated) -> Iterator[Engine]:
    engine = make_engine(pair.primary.url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def api(pair: Replicated, primary_engine: Engine, redis_url: str) -> Iterator[TestClient]:
    settings = Settings(
        database_url=pair.primary.url,
        database_read_url=pair.replica.url,
        broker_url=redis_url,
        api_rate_per_second=0,
    )
    platform = build_platform(settings)
    with TestClient(create_app(platform.api_state())) as client:
        yield client
    platform.store.dispose()


def auth(engine: Engine) -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    return {"Authorization": f"Bearer {key}"}


def served(client: TestClient) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        database: float(count)
        for database, count in re.findall(
            r'^conveyor_db_reads_total\{database="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE
        )
    }


def listed(client: TestClient, headers: dict[str, str]) -> list[str]:
    answer = client.get("/v1/jobs", headers=headers)
    assert answer.status_code == 200, answer.text
    return [item["id"] for item in answer.json()["items"]]


def test_reads_go_to_the_replica_and_a_client_finds_its_own_writes_while_it_lags(
    api: TestClient, pair: Replicated, primary_engine: Engine
) -> None:
    headers = auth(primary_engine)
    wait_until(pair.caught_up, timeout=30, what="the replica to catch up")
    before = served(api)
    pair.pause_replay()
    job: dict[str, Any] = api.post(
        "/v1/jobs", json={"task": "demo.echo", "payload": {"n": 1}}, headers=headers
    ).json()
    # The replica has not applied the new job: the listing (replica) does not show it...
    assert job["id"] not in listed(api, headers)
    # ...but the job by id is found, read again on the primary.
    found = api.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert found.status_code == 200 and found.json()["id"] == job["id"]
    assert api.get(f"/v1/jobs/{job['id']}/events", headers=headers).status_code == 200

    def lag() -> float | None:
        checks = api.get("/readyz").json()["checks"]
        seconds = re.match(r"ok, ([0-9.]+) s behind", checks["replica"])
        assert seconds is not None, checks
        return float(seconds.group(1)) if float(seconds.group(1)) >= 1.0 else None

    seen = wait_until(lag, timeout=20, interval=0.2, what="/readyz to report the lag")
    # A cancel decides on the primary, whatever the replica has seen.
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    pair.resume_replay()
    wait_until(lambda: job["id"] in listed(api, headers), timeout=30, what="the replica")
    fresh = api.get(f"/v1/jobs/{job['id']}?wait=10", headers=headers).json()
    assert fresh["state"] == "cancelled"
    assert api.get("/v1/stats?window=1h", headers=headers).status_code == 200
    after = served(api)
    replica_reads = after["replica"] - before.get("replica", 0)
    primary_reads = after["primary"] - before.get("primary", 0)
    # Listings, stats, waits and the first read of each lookup went to the replica; the
    # primary served only the lookups the lagging replica could not answer.
    report(
        test="read replica, lagging",
        lag_seen_seconds=seen,
        reads_by_replica=replica_reads,
        reads_by_primary=primary_reads,
    )
    assert replica_reads >= 5 and 2 <= primary_reads <= 3, (replica_reads, primary_reads, seen)


def test_when_the_replica_goes_away_reads_fall_back_to_the_primary(
    api: TestClient, pair: Replicated, primary_engine: Engine
) -> None:
    headers = auth(primary_engine)
    job = api.post("/v1/jobs", json={"task": "demo.echo", "payload": {}}, headers=headers).json()
    wait_until(lambda: job["id"] in listed(api, headers), timeout=30, what="the replica")
    pair.replica.stop("immediate")
    before = served(api)
    assert job["id"] in listed(api, headers)
    assert api.get(f"/v1/jobs/{job['id']}", headers=headers).status_code == 200
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["replica"].startswith("unavailable")
    assert "reads go to the primary" in ready.json()["checks"]["replica"]
    after = served(api)
    report(
        test="read replica, gone",
        reads_by_replica=after.get("replica", 0) - before.get("replica", 0),
        reads_by_primary=after["primary"] - before["primary"],
        readyz=ready.json()["checks"]["replica"],
    )
    assert after["primary"] - before["primary"] >= 2
    assert after.get("replica", 0) == before.get("replica", 0)
    # Writes never needed the replica.
    again = api.post("/v1/jobs", json={"task": "demo.echo", "payload": {}}, headers=headers)
    assert again.status_code == 202


def test_the_console_reads_the_replica(
    api: TestClient, pair: Replicated, primary_engine: Engine
) -> None:
    headers = auth(primary_engine)
    key = headers["Authorization"].removeprefix("Bearer ")
    job = api.post("/v1/jobs", json={"task": "demo.echo", "payload": {}}, headers=headers).json()
    wait_until(pair.caught_up, timeout=30, what="the replica to catch up")
    form = api.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    signed = api.post("/ui/login", data={"csrf_token": token.group(1), "key": key})
    assert signed.status_code == 200
    before = served(api)
    assert job["id"][:12] in api.get("/ui/jobs").text
    assert job["id"] in api.get(f"/ui/jobs/{job['id']}").text
    assert api.get("/ui/").status_code == 200
    after = served(api)
    assert after["replica"] - before.get("replica", 0) >= 3
    assert after["primary"] == before["primary"]
