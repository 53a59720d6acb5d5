"""The HTTP API on PostgreSQL and Redis: submission, reading, auth and bad input."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import jobs

PROBLEM = "application/problem+json"


@pytest.fixture
def settings(pg_engine: Engine, pg_url: str, redis_url: str) -> Settings:
    return Settings(database_url=pg_url, broker_url=redis_url, max_body_bytes=4096)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    platform = build_platform(settings)
    with TestClient(create_app(platform.api_state())) as test_client:
        yield test_client
    platform.store.dispose()


def make_key(engine: Engine, tenant: str = "acme", scopes: tuple[str, ...] = keys.SCOPES) -> str:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant, scopes=scopes)
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def queued_messages(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    return sum(int(client.llen(name)) for name in ("high", "default", "low"))


def test_submit_records_and_publishes(
    client: TestClient, pg_engine: Engine, redis_url: str
) -> None:
    key = make_key(pg_engine)
    response = client.post(
        "/v1/jobs",
        json={"task": "demo.echo", "payload": {"n": 1}, "priority": "high", "tags": ["t1"]},
        headers=auth(key),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["state"] == "queued"
    assert body["queue"] == "high"
    assert body["payload"] == {"n": 1}
    assert body["max_attempts"] == 3
    assert body["tags"] == ["t1"]
    assert job_count(pg_engine) == 1
    assert redis.Redis.from_url(redis_url).llen("high") == 1

    read = client.get(response.headers["location"], headers=auth(key))
    assert read.status_code == 200
    assert read.json()["id"] == body["id"]
    events = client.get(f"/v1/jobs/{body['id']}/events", headers=auth(key)).json()
    assert [e["event"] for e in events["items"]] == ["created"]


def test_delayed_job_is_scheduled(client: TestClient, pg_engine: Engine) -> None:
    key = make_key(pg_engine)
    response = client.post(
        "/v1/jobs", json={"task": "demo.echo", "delay_seconds": 3600}, headers=auth(key)
    )
    assert response.status_code == 202
    assert response.json()["state"] == "scheduled"


def test_task_types_list_the_built_ins(client: TestClient, pg_engine: Engine) -> None:
    key = make_key(pg_engine, scopes=("read",))
    response = client.get("/v1/task-types", headers=auth(key))
    assert response.status_code == 200
    by_name = {t["name"]: t for t in response.json()["items"]}
    assert {"demo.echo", "demo.sleep", "demo.fail", "webhook.deliver"} <= set(by_name)
    sleep_schema = by_name["demo.sleep"]["payload_schema"]
    assert sleep_schema["properties"]["seconds"]["maximum"] == 3600


def test_idempotency_key_replays_and_refuses_other_bodies(
    client: TestClient, pg_engine: Engine
) -> None:
    key = make_key(pg_engine)
    headers = {**auth(key), "Idempotency-Key": "order-42"}
    first = client.post(
        "/v1/jobs", json={"task": "demo.echo", "payload": {"a": 1}}, headers=headers
    )
    again = client.post(
        "/v1/jobs", json={"task": "demo.echo", "payload": {"a": 1}}, headers=headers
    )
    other = client.post(
        "/v1/jobs", json={"task": "demo.echo", "payload": {"a": 2}}, headers=headers
    )
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 422
    assert other.headers["content-type"] == PROBLEM
    assert job_count(pg_engine) == 1


def test_other_tenant_sees_404(client: TestClient, pg_engine: Engine) -> None:
    mine = make_key(pg_engine, tenant="acme")
    theirs = make_key(pg_engine, tenant="globex")
    job_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=auth(mine)).json()["id"]
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
        response = client.get(path, headers=auth(theirs))
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert job_id not in response.text or "no job" in response.json()["detail"]


def test_missing_scope_is_403(client: TestClient, pg_engine: Engine) -> None:
    reader = make_key(pg_engine, scopes=("read",))
    submitter = make_key(pg_engine, scopes=("submit",))
    denied = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=auth(reader))
    assert denied.status_code == 403
    assert denied.headers["content-type"] == PROBLEM
    job_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=auth(submitter)).json()[
        "id"
    ]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(submitter)).status_code == 403
    assert job_count(pg_engine) == 1


BAD_BODIES = [
    pytest.param({"task": "demo.nosuch", "payload": {}}, 422, "unknown-task", id="unknown-task"),
    pytest.param(
        {"task": "demo.sleep", "payload": {"seconds": -1}},
        422,
        "invalid-payload",
        id="invalid-payload",
    ),
    pytest.param(
        {"task": "demo.sleep", "payload": {"seconds": 4000}},
        422,
        "invalid-payload",
        id="payload-over-limit",
    ),
    pytest.param(
        {"task": "demo.fail", "payload": {"failures": "x"}},
        422,
        "invalid-payload",
        id="payload-wrong-type",
    ),
    pytest.param({"payload": {}}, 422, "validation-error", id="missing-task"),
    pytest.param(
        {"task": "demo.echo", "priority": "urgent"}, 422, "validation-error", id="unknown-priority"
    ),
    pytest.param(
        {"task": "demo.echo", "delay_seconds": 1, "run_at": "2030-01-01T00:00:00Z"},
        422,
        "validation-error",
        id="delay-and-run-at",
    ),
    pytest.param({"task": "demo.echo", "bogus": 1}, 422, "validation-error", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "status", "slug"), BAD_BODIES)
def test_bad_bodies_get_problems_and_store_nothing(
    client: TestClient, pg_engine: Engine, redis_url: str, body: object, status: int, slug: str
) -> None:
    key = make_key(pg_engine)
    response = client.post("/v1/jobs", json=body, headers=auth(key))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"].endswith(slug)
    assert problem["title"] and problem["detail"]
    assert problem["errors"] and all({"loc", "msg"} <= set(e) for e in problem["errors"])
    assert job_count(pg_engine) == 0
    assert queued_messages(redis_url) == 0


def test_malformed_json_is_a_problem(client: TestClient, pg_engine: Engine, redis_url: str) -> None:
    key = make_key(pg_engine)
    response = client.post(
        "/v1/jobs",
        content=b'{"task": "demo.echo", ',
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"].endswith("malformed-json")
    assert "Traceback" not in response.text
    assert job_count(pg_engine) == 0
    assert queued_messages(redis_url) == 0


def test_oversized_body_is_413(client: TestClient, pg_engine: Engine, redis_url: str) -> None:
    key = make_key(pg_engine)
    body = json.dumps({"task": "demo.echo", "payload": {"blob": "x" * 10_000}})
    response = client.post(
        "/v1/jobs", content=body, headers={**auth(key), "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["status"] == 413
    assert job_count(pg_engine) == 0
    assert queued_messages(redis_url) == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer cvk_not-a-real-key"}, id="unknown"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="wrong-scheme"),
    ],
)
def test_bad_keys_are_401(
    client: TestClient, pg_engine: Engine, redis_url: str, headers: dict[str, str]
) -> None:
    response = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert job_count(pg_engine) == 0
    assert queued_messages(redis_url) == 0


def test_unknown_route_method_and_id_are_problems(client: TestClient, pg_engine: Engine) -> None:
    key = make_key(pg_engine)
    assert client.get("/v1/nothing", headers=auth(key)).headers["content-type"] == PROBLEM
    wrong_method = client.delete("/v1/task-types", headers=auth(key))
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == PROBLEM
    missing = client.get(f"/v1/jobs/{uuid.uuid4()}", headers=auth(key))
    assert missing.status_code == 404
    bad_id = client.get("/v1/jobs/not-a-uuid", headers=auth(key))
    assert bad_id.status_code == 422
    assert bad_id.headers["content-type"] == PROBLEM


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readiness_names_a_dead_broker(pg_url: str, pg_engine: Engine) -> None:
    settings = Settings(database_url=pg_url, broker_url="redis://127.0.0.1:1/0")
    platform = build_platform(settings)
    with TestClient(create_app(platform.api_state())) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert "broker" in response.json()["detail"]
    assert response.json()["checks"]["database"] == "ok"


def test_openapi_is_served(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"]
    assert "/v1/jobs/{job_id}/events" in schema["paths"]
