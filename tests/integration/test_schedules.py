"""Users' schedules: the API, tick computation, misfire policies and exactly-once firing."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update

from conveyor.api.app import create_app
from conveyor.beat.scheduler import fire_due
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, schedules
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import jobs
from conveyor.jobs.tables import schedules as schedules_table

PROBLEM = "application/problem+json"
UTC = dt.UTC


@pytest.fixture
def platform(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[object]:
    built = build_platform(
        Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    )
    yield built
    built.store.dispose()


@pytest.fixture
def client(platform: object) -> Iterator[TestClient]:
    with TestClient(create_app(platform.api_state())) as test_client:  # type: ignore[attr-defined]
        yield test_client


def key_headers(engine: Engine, tenant: str = "acme") -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant)
    return {"Authorization": f"Bearer {key}"}


def scheduled_ticks(engine: Engine) -> list[dt.datetime]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(jobs.c.schedule_tick)
            .where(jobs.c.schedule_id.is_not(None))
            .order_by(jobs.c.schedule_tick)
        ).all()
    return [tick for (tick,) in rows]


def test_schedule_api_validates_and_scopes(client: TestClient, pg_engine: Engine) -> None:
    headers = key_headers(pg_engine)
    other = key_headers(pg_engine, "globex")
    good = {
        "name": "nightly",
        "task": "demo.echo",
        "payload": {"a": 1},
        "cron": "0 3 * * *",
        "timezone": "Europe/Paris",
    }
    created = client.post("/v1/schedules", json=good, headers=headers)
    assert created.status_code == 201, created.text
    body = created.json()
    next_run = dt.datetime.fromisoformat(body["next_run_at"])
    assert next_run.astimezone(dt.timezone(dt.timedelta(hours=1))).hour in (2, 3)
    assert client.post("/v1/schedules", json=good, headers=headers).status_code == 409
    for bad in (
        {**good, "name": "b1", "cron": "61 * * * *"},
        {**good, "name": "b2", "timezone": "Mars/Olympus"},
        {**good, "name": "b3", "task": "demo.nosuch"},
        {**good, "name": "b4", "task": "demo.sleep", "payload": {"seconds": -1}},
        {**good, "name": "b5", "interval_seconds": 5},
        {"name": "b6", "task": "demo.echo"},
    ):
        response = client.post("/v1/schedules", json=bad, headers=headers)
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"] == PROBLEM
    assert client.get("/v1/schedules/nightly", headers=other).status_code == 404
    assert (
        client.patch("/v1/schedules/nightly", json={"enabled": False}, headers=other).status_code
        == 404
    )
    assert client.delete("/v1/schedules/nightly", headers=other).status_code == 404
    assert client.get("/v1/schedules", headers=other).json()["items"] == []
    paused = client.patch("/v1/schedules/nightly", json={"enabled": False}, headers=headers)
    assert paused.json()["enabled"] is False
    retimed = client.patch("/v1/schedules/nightly", json={"interval_seconds": 60}, headers=headers)
    assert retimed.json()["cron"] is None and retimed.json()["interval_seconds"] == 60
    assert client.delete("/v1/schedules/nightly", headers=headers).status_code == 204
    assert client.get("/v1/schedules/nightly", headers=headers).status_code == 404


def test_cron_ticks_follow_the_time_zone() -> None:
    after = dt.datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    first = schedules.next_tick(
        cron="30 2 * * *", interval_seconds=None, timezone="America/New_York", after=after
    )
    assert first == dt.datetime(2026, 3, 29, 6, 30, tzinfo=UTC)
    tick = schedules.next_tick(
        cron=None,
        interval_seconds=10,
        timezone="UTC",
        after=after + dt.timedelta(seconds=25),
        anchor=after,
    )
    assert tick == after + dt.timedelta(seconds=30)


def _overdue(engine: Engine, name: str, minutes: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(schedules_table)
            .where(schedules_table.c.name == name)
            .values(next_run_at=dt.datetime.now(UTC) - dt.timedelta(minutes=minutes, seconds=31))
        )


@pytest.mark.parametrize(("misfire", "expected"), [("run_once", 1), ("skip", 0)])
def test_misfire_policy_after_beat_was_down(
    platform: object, client: TestClient, pg_engine: Engine, misfire: str, expected: int
) -> None:
    headers = key_headers(pg_engine)
    client.post(
        "/v1/schedules",
        json={
            "name": "every-minute",
            "task": "demo.echo",
            "interval_seconds": 60,
            "misfire": misfire,
        },
        headers=headers,
    )
    _overdue(pg_engine, "every-minute", minutes=5)
    created = fire_due(platform.celery, misfire_grace_seconds=30)  # type: ignore[attr-defined]
    assert len(created) == expected
    again = fire_due(platform.celery, misfire_grace_seconds=30)  # type: ignore[attr-defined]
    assert again == []
    schedule = client.get("/v1/schedules/every-minute", headers=headers).json()
    assert dt.datetime.fromisoformat(schedule["next_run_at"]) > dt.datetime.now(UTC)
    assert len(schedule["recent_runs"]) == expected


def test_ticks_within_the_grace_all_fire_once_even_from_two_beats(
    platform: object, client: TestClient, pg_engine: Engine
) -> None:
    headers = key_headers(pg_engine)
    client.post(
        "/v1/schedules",
        json={"name": "fast", "task": "demo.echo", "interval_seconds": 5},
        headers=headers,
    )
    with pg_engine.begin() as conn:
        conn.execute(
            update(schedules_table).values(
                next_run_at=dt.datetime.now(UTC) - dt.timedelta(seconds=12)
            )
        )
    barrier = threading.Barrier(2)
    results: list[int] = []

    def beat() -> None:
        barrier.wait(timeout=10)
        results.append(len(fire_due(platform.celery, misfire_grace_seconds=30)))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=beat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    ticks = scheduled_ticks(pg_engine)
    assert sum(results) == 3
    assert len(ticks) == 3 == len(set(ticks))
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(ticks)}
    assert gaps == {5.0}


def test_a_schedule_fires_a_workflow_once_per_tick(
    platform: object, client: TestClient, pg_engine: Engine
) -> None:
    headers = key_headers(pg_engine)
    flow = {
        "name": "nightly",
        "steps": [
            {"key": "extract", "task": "demo.echo", "payload": {"n": 1}},
            {"key": "load", "task": "demo.collect", "after": ["extract"]},
        ],
    }
    # The workflow is checked as POST /v1/workflows checks it.
    refused = client.post(
        "/v1/schedules",
        json={
            "name": "bad",
            "task": "conveyor.workflow",
            "interval_seconds": 60,
            "payload": {"steps": [{"key": "a", "task": "demo.echo", "after": ["ghost"]}]},
        },
        headers=headers,
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["loc"] == ["body", "payload", "steps", 0, "after"]
    created = client.post(
        "/v1/schedules",
        json={
            "name": "etl",
            "task": "conveyor.workflow",
            "interval_seconds": 60,
            "payload": flow,
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    _overdue(pg_engine, "etl", minutes=1)
    ready = fire_due(platform.celery, misfire_grace_seconds=30)  # type: ignore[attr-defined]
    assert [job.step for job in ready] == ["extract"]
    assert fire_due(platform.celery, misfire_grace_seconds=30) == []  # type: ignore[attr-defined]
    listed = client.get("/v1/workflows", headers=headers).json()["items"]
    assert [(w["name"], w["state"]) for w in listed] == [("nightly", "running")]
    workflow = client.get(f"/v1/workflows/{listed[0]['id']}", headers=headers).json()
    assert [(s["key"], s["state"]) for s in workflow["steps"]] == [
        ("extract", "queued"),
        ("load", "pending"),
    ]
    # The schedule's recent runs name the workflow's first step.
    schedule = client.get("/v1/schedules/etl", headers=headers).json()
    assert [run["job_id"] for run in schedule["recent_runs"]] == [workflow["steps"][0]["job_id"]]
