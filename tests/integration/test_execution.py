"""Jobs run by real worker processes on PostgreSQL and Redis, submitted through the API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import job_events, jobs
from tests import workers
from tests.support import wait_until


@pytest.fixture
def platform_client(
    pg_engine: Engine, pg_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[TestClient, str]]:
    """The API in-process and one real worker process per pool."""
    env = workers.service_env(pg_url, redis_url)
    commands = [["worker", "--pool", pool] for pool in ("high", "default", "low")]
    platform = build_platform(
        Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    )
    with make_session_factory(pg_engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    with (
        workers.running(commands, env, tmp_path),
        TestClient(create_app(platform.api_state())) as client,
    ):
        yield client, key
    platform.store.dispose()


def states(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
    return {state: count for state, count in rows}


def test_thousand_echo_jobs_each_claimed_and_finished_once(
    platform_client: tuple[TestClient, str], pg_engine: Engine
) -> None:
    client, key = platform_client
    headers = {"Authorization": f"Bearer {key}"}
    ids = []
    for n in range(1000):
        response = client.post(
            "/v1/jobs", json={"task": "demo.echo", "payload": {"n": n}}, headers=headers
        )
        assert response.status_code == 202
        ids.append(response.json()["id"])
    assert len(set(ids)) == 1000
    wait_until(
        lambda: states(pg_engine).get("succeeded") == 1000,
        timeout=120,
        interval=0.25,
        what="1,000 jobs to succeed",
    )
    assert states(pg_engine) == {"succeeded": 1000}
    with pg_engine.connect() as conn:
        per_job = conn.execute(
            select(
                job_events.c.job_id,
                func.count().filter(job_events.c.event == "claimed"),
                func.count().filter(job_events.c.event == "succeeded"),
            ).group_by(job_events.c.job_id)
        ).all()
        results = conn.execute(select(jobs.c.payload, jobs.c.result, jobs.c.attempts)).all()
    assert len(per_job) == 1000
    assert all(claims == 1 and successes == 1 for _, claims, successes in per_job)
    assert all(result == payload and attempts == 1 for payload, result, attempts in results)


def _events(engine: Engine, job_id: str) -> list[tuple[str, float, object]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(job_events.c.event, job_events.c.at, job_events.c.detail)
            .where(job_events.c.job_id == job_id)
            .order_by(job_events.c.id)
        ).all()
    return [(event, at.timestamp(), detail) for event, at, detail in rows]


def run_to_the_end(
    client: TestClient, headers: dict[str, str], body: dict[str, Any], what: str
) -> tuple[str, dict[str, Any]]:
    """Submit one job through the API; its id and its body once it succeeded or went dead."""
    job_id: str = client.post("/v1/jobs", json=body, headers=headers).json()["id"]

    def finished() -> dict[str, Any] | None:
        found: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return found if found["state"] in ("succeeded", "dead") else None

    return job_id, wait_until(finished, timeout=30, interval=0.1, what=what)


def test_failing_job_retries_with_growing_delays_then_succeeds(
    platform_client: tuple[TestClient, str], pg_engine: Engine
) -> None:
    client, key = platform_client
    headers = {"Authorization": f"Bearer {key}"}
    job_id, done = run_to_the_end(
        client, headers, {"task": "demo.fail", "payload": {"failures": 2}}, "demo.fail to finish"
    )
    assert done["state"] == "succeeded"
    assert done["attempts"] == 3
    assert done["result"] == {"attempt": 3}
    history = _events(pg_engine, job_id)
    assert [e for e, _, _ in history] == [
        "created",
        "claimed",
        "failed",
        "promoted",
        "claimed",
        "failed",
        "promoted",
        "claimed",
        "succeeded",
    ]
    failed_at = [at for event, at, _ in history if event == "failed"]
    claimed_at = [at for event, at, _ in history if event == "claimed"]
    planned = [
        detail["retry_in_seconds"]
        for event, _, detail in history  # type: ignore[index]
        if event == "failed"
    ]
    waited = [claimed_at[1] - failed_at[0], claimed_at[2] - failed_at[1]]
    assert planned[1] > planned[0] > 0
    assert waited[1] > waited[0]
    for actual, intended in zip(waited, planned, strict=True):
        assert actual >= intended - 0.05


def test_permanent_failure_goes_dead_after_one_attempt(
    platform_client: tuple[TestClient, str], pg_engine: Engine
) -> None:
    client, key = platform_client
    headers = {"Authorization": f"Bearer {key}"}
    job_id, done = run_to_the_end(
        client,
        headers,
        {"task": "demo.fail", "payload": {"failures": 5, "retryable": False}},
        "demo.fail to go dead",
    )
    assert done["state"] == "dead"
    assert done["attempts"] == 1
    assert done["error"]["type"] == "conveyor.tasks.registry.PermanentError"
    assert "failure 1 of 5" in done["error"]["message"]
    assert "Traceback" in done["error"]["traceback"]
    assert [e for e, _, _ in _events(pg_engine, job_id)] == ["created", "claimed", "dead"]


def test_per_job_time_limit_ends_the_attempt_as_a_failure(
    platform_client: tuple[TestClient, str], pg_engine: Engine
) -> None:
    client, key = platform_client
    headers = {"Authorization": f"Bearer {key}"}
    job_id, done = run_to_the_end(
        client,
        headers,
        {"task": "demo.sleep", "payload": {"seconds": 60}, "timeout_seconds": 1, "max_attempts": 1},
        "the timed-out job to go dead",
    )
    assert done["state"] == "dead"
    assert done["error"]["type"].endswith("SoftTimeLimitExceeded")
    assert done["finished_at"] is not None
    history = [e for e, _, _ in _events(pg_engine, job_id)]
    assert history == ["created", "claimed", "dead"]


def test_transactional_enqueue_publishes_only_after_commit(
    platform_client: tuple[TestClient, str], pg_engine: Engine, pg_url: str, redis_url: str
) -> None:
    from conveyor.enqueue import enqueue

    publisher = build_platform(Settings(database_url=pg_url, broker_url=redis_url)).publisher
    sessions = make_session_factory(pg_engine)
    with sessions() as session:
        session.begin()
        rolled_back = enqueue(session, "demo.echo", {"kept": False}, publisher=publisher)
        session.rollback()
    with sessions() as session, session.begin():
        committed = enqueue(session, "demo.echo", {"kept": True}, publisher=publisher)
    done = wait_until(
        lambda: states(pg_engine).get("succeeded") == 1,
        timeout=30,
        what="the committed job to run",
    )
    assert done
    with pg_engine.connect() as conn:
        rows = conn.execute(select(jobs.c.id, jobs.c.state, jobs.c.result)).all()
        claims = conn.execute(
            select(func.count()).where(
                job_events.c.job_id == committed.id, job_events.c.event == "claimed"
            )
        ).scalar_one()
    assert [(r.id, r.state, r.result) for r in rows] == [
        (committed.id, "succeeded", {"kept": True})
    ]
    assert rolled_back.id not in {r.id for r in rows}
    assert claims == 1
