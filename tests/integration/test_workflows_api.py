"""/v1/workflows on PostgreSQL and Redis: validation, reading, listing, cancel, tenants."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from conveyor.jobs import keys, store
from conveyor.jobs.db import make_session_factory

PROBLEM = "application/problem+json"


def auth(engine: Engine, tenant: str = "acme") -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant)
    return {"Authorization": f"Bearer {key}"}


def chain() -> dict[str, Any]:
    return {
        "name": "etl",
        "tags": ["nightly"],
        "steps": [
            {"key": "fetch", "task": "demo.echo", "payload": {"n": 1}},
            {"key": "transform", "task": "demo.echo", "after": ["fetch"]},
            {"key": "load", "task": "demo.collect", "after": ["transform"], "run_if": "finished"},
        ],
    }


def test_a_workflow_is_recorded_its_first_step_published(
    client: TestClient, pg_engine: Engine, redis_url: str
) -> None:
    headers = auth(pg_engine)
    answer = client.post("/v1/workflows", json=chain(), headers=headers)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert answer.headers["Location"] == f"/v1/workflows/{body['id']}"
    assert body["state"] == "running" and body["name"] == "etl" and body["tags"] == ["nightly"]
    assert body["finished_at"] is None
    steps = {s["key"]: s for s in body["steps"]}
    assert [s["key"] for s in body["steps"]] == ["fetch", "transform", "load"]
    assert {k: s["state"] for k, s in steps.items()} == {
        "fetch": "queued",
        "transform": "pending",
        "load": "pending",
    }
    assert steps["load"]["after"] == ["transform"] and steps["fetch"]["after"] == []
    # Every step is a job, carrying its workflow and key.
    job = client.get(f"/v1/jobs/{steps['transform']['job_id']}", headers=headers).json()
    assert (job["workflow_id"], job["step"], job["state"]) == (body["id"], "transform", "pending")
    # Only the step that can run has a message.
    queued = redis.Redis.from_url(redis_url).lrange("default", 0, -1)
    assert len(queued) == 1
    assert json.loads(queued[0])["headers"]["argsrepr"] == repr([steps["fetch"]["job_id"]])
    # Read back, and listed.
    again = client.get(f"/v1/workflows/{body['id']}", headers=headers).json()
    assert again["steps"] == body["steps"]
    listed = client.get("/v1/workflows?state=running", headers=headers).json()
    assert [w["id"] for w in listed["items"]] == [body["id"]]
    assert client.get("/v1/workflows?state=failed", headers=headers).json()["items"] == []


def test_every_step_is_checked_before_anything_is_kept(
    client: TestClient, pg_engine: Engine
) -> None:
    headers = auth(pg_engine)
    cases: list[tuple[dict[str, Any], list[Any]]] = [
        (
            {"steps": [{"key": "a", "task": "demo.echo"}, {"key": "b", "task": "nope"}]},
            ["body", "steps", 1, "task"],
        ),
        (
            {"steps": [{"key": "a", "task": "demo.sleep", "payload": {"seconds": -1}}]},
            ["body", "steps", 0, "payload", "seconds"],
        ),
        (
            {"steps": [{"key": "a", "task": "demo.echo", "after": ["ghost"]}]},
            ["body", "steps", 0, "after"],
        ),
        (
            {
                "steps": [
                    {"key": "a", "task": "demo.echo", "after": ["b"]},
                    {"key": "b", "task": "demo.echo", "after": ["a"]},
                ]
            },
            ["body", "steps", 0, "after"],
        ),
        (
            {"steps": [{"key": "a", "task": "demo.echo"}, {"key": "a", "task": "demo.echo"}]},
            ["body", "steps", 1, "key"],
        ),
        ({"steps": [{"key": "bad key", "task": "demo.echo"}]}, ["body", "steps", 0, "key"]),
        ({"steps": []}, ["body", "steps"]),
        (
            {"steps": [{"key": "a", "task": "demo.echo", "run_if": "sometimes"}]},
            ["body", "steps", 0, "run_if"],
        ),
    ]
    for body, loc in cases:
        answer = client.post("/v1/workflows", json=body, headers=headers)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.headers["content-type"].startswith(PROBLEM)
        locs = [e["loc"][: len(loc)] for e in answer.json()["errors"]]
        assert loc in locs, (body, answer.json())
    assert client.get("/v1/workflows", headers=headers).json()["items"] == []
    assert client.get("/v1/jobs", headers=headers).json()["items"] == []


def test_cancel_and_tenants(client: TestClient, pg_engine: Engine) -> None:
    headers = auth(pg_engine)
    body = client.post("/v1/workflows", json=chain(), headers=headers).json()
    other = auth(pg_engine, tenant="other")
    assert client.get(f"/v1/workflows/{body['id']}", headers=other).status_code == 404
    assert client.post(f"/v1/workflows/{body['id']}/cancel", headers=other).status_code == 404
    assert client.get(f"/v1/workflows/{uuid.uuid4()}", headers=headers).status_code == 404
    cancelled = client.post(f"/v1/workflows/{body['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200, cancelled.text
    done = cancelled.json()
    assert done["state"] == "cancelled" and done["finished_at"] is not None
    assert {s["state"] for s in done["steps"]} == {"cancelled"}
    again = client.post(f"/v1/workflows/{body['id']}/cancel", headers=headers)
    assert again.status_code == 409 and again.headers["content-type"].startswith(PROBLEM)
    # ?wait= on a finished workflow answers at once.
    waited = client.get(f"/v1/workflows/{body['id']}?wait=5", headers=headers)
    assert waited.json()["state"] == "cancelled"
    # Counted in the stats beside the jobs, for its own tenant only.
    assert client.get("/v1/stats", headers=headers).json()["workflows"] == {"cancelled": 1}
    assert client.get("/v1/stats", headers=other).json()["workflows"] == {}


def test_an_idempotency_key_replays_the_workflow(client: TestClient, pg_engine: Engine) -> None:
    headers = {**auth(pg_engine), "Idempotency-Key": "wf-1"}
    first = client.post("/v1/workflows", json=chain(), headers=headers)
    second = client.post("/v1/workflows", json=chain(), headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/v1/workflows", json={**chain(), "name": "other"}, headers=headers)
    assert other.status_code == 422


def test_a_waiting_read_is_answered_when_the_last_step_finishes(
    client: TestClient, pg_engine: Engine
) -> None:
    headers = auth(pg_engine)
    body = client.post("/v1/workflows", json=chain(), headers=headers).json()
    answers: list[dict[str, Any]] = []

    def wait() -> None:
        answer = client.get(f"/v1/workflows/{body['id']}?wait=30", headers=headers)
        answers.append(answer.json())

    waiter = threading.Thread(target=wait)
    waiter.start()
    sessions = make_session_factory(pg_engine)
    for one in body["steps"]:
        with sessions.begin() as session:
            claimed = store.claim(session, uuid.UUID(one["job_id"]), worker="w", lease_seconds=30)
            assert claimed is not None, one["key"]
            store.succeed(
                session, claimed.id, worker="w", token=claimed.lease_token, result=one["key"]
            )
        assert waiter.is_alive() or one is body["steps"][-1]
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    [done] = answers
    assert done["state"] == "succeeded" and done["finished_at"] is not None
    assert {s["state"] for s in done["steps"]} == {"succeeded"}
