"""The whole HTTP surface: tenants and scopes on every route, pagination, idempotency, batch."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.models import JobError
from conveyor.jobs.tables import jobs

PROBLEM = "application/problem+json"


def new_key(engine: Engine, tenant: str, scopes: tuple[str, ...] = keys.SCOPES) -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant, scopes=scopes)
    return {"Authorization": f"Bearer {key}"}


def kill_job(engine: Engine, job_id: str) -> None:
    """Make a job dead through the store's own transitions, as a worker would."""
    sessions = make_session_factory(engine)
    parsed = uuid.UUID(job_id)
    with sessions.begin() as session:
        claimed = store.claim(session, parsed, worker="test:1", lease_seconds=30)
        assert claimed is not None
        store.dead(session, parsed, worker="test:1", token=1, error=JobError("Boom", "it broke"))


def routes(job_id: str, dead_id: str) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """Every route that touches an object, with the scope it needs."""
    return [
        ("GET", f"/v1/jobs/{job_id}", None, "read"),
        ("GET", f"/v1/jobs/{job_id}/events", None, "read"),
        ("POST", f"/v1/jobs/{job_id}/cancel", None, "submit"),
        ("POST", f"/v1/jobs/{dead_id}/retry", None, "submit"),
        ("DELETE", f"/v1/dead-letters/{dead_id}", None, "admin"),
    ]


def test_another_tenant_gets_404_and_never_data(client: TestClient, pg_engine: Engine) -> None:
    mine = new_key(pg_engine, "acme")
    theirs = new_key(pg_engine, "globex")
    job_id = client.post(
        "/v1/jobs", json={"task": "demo.echo", "payload": {"secret": 1}}, headers=mine
    ).json()["id"]
    dead_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=mine).json()["id"]
    kill_job(pg_engine, dead_id)
    for method, path, body, _scope in routes(job_id, dead_id):
        response = client.request(method, path, json=body, headers=theirs)
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert "secret" not in response.text
    listings = [
        ("GET", "/v1/jobs", None),
        ("GET", "/v1/dead-letters", None),
        ("GET", "/v1/stats", None),
        ("GET", "/v1/queues", None),
    ]
    for method, path, body in listings:
        response = client.request(method, path, json=body, headers=theirs)
        assert response.status_code == 200
        assert job_id not in response.text and dead_id not in response.text
    replay = client.post("/v1/dead-letters/replay", json={"ids": [dead_id]}, headers=theirs)
    assert replay.json() == {"replayed": 0}
    replay_all = client.post("/v1/dead-letters/replay", json={}, headers=theirs)
    assert replay_all.json() == {"replayed": 0}
    queues = client.get("/v1/queues", headers=theirs).json()["items"]
    assert all(q["queued"] == 0 for q in queues)
    # Nothing of the first tenant was changed by the other's requests.
    assert client.get(f"/v1/jobs/{job_id}", headers=mine).json()["state"] == "queued"
    assert client.get(f"/v1/jobs/{dead_id}", headers=mine).json()["state"] == "dead"


@pytest.mark.parametrize("missing", ["read", "submit", "admin"])
def test_a_missing_scope_is_403_on_every_route(
    client: TestClient, pg_engine: Engine, missing: str
) -> None:
    owner = new_key(pg_engine, "acme")
    limited = new_key(
        pg_engine, "acme", tuple(s for s in keys.SCOPES if s not in (missing, "admin"))
    )
    job_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=owner).json()["id"]
    dead_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=owner).json()["id"]
    kill_job(pg_engine, dead_id)
    scoped = [
        *routes(job_id, dead_id),
        ("POST", "/v1/jobs", {"task": "demo.echo"}, "submit"),
        ("POST", "/v1/jobs/batch", {"jobs": [{"task": "demo.echo"}]}, "submit"),
        ("GET", "/v1/jobs", None, "read"),
        ("GET", "/v1/task-types", None, "read"),
        ("GET", "/v1/dead-letters", None, "read"),
        ("POST", "/v1/dead-letters/replay", {"ids": [dead_id]}, "submit"),
        ("GET", "/v1/queues", None, "read"),
        ("GET", "/v1/stats", None, "read"),
    ]
    before = _count(pg_engine)
    for method, path, body, scope in scoped:
        if scope != missing:
            continue
        response = client.request(method, path, json=body, headers=limited)
        assert response.status_code == 403, (method, path, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert job_id not in response.text
    assert _count(pg_engine) == before
    assert client.get(f"/v1/jobs/{dead_id}", headers=owner).json()["state"] == "dead"


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def test_pagination_returns_each_job_once_while_jobs_arrive(
    client: TestClient, pg_engine: Engine
) -> None:
    headers = new_key(pg_engine, "acme")
    for _ in range(10):
        response = client.post(
            "/v1/jobs/batch",
            json={"jobs": [{"task": "demo.echo", "payload": {"n": n}} for n in range(1000)]},
            headers=headers,
        )
        assert response.status_code == 202
    with pg_engine.connect() as conn:
        existing = {str(i) for (i,) in conn.execute(select(jobs.c.id))}
    assert len(existing) == 10_000
    seen: list[str] = []
    arrivals = 0
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params, headers=headers).json()
        seen += [item["id"] for item in page["items"]]
        if arrivals < 1000:
            batch = client.post(
                "/v1/jobs/batch",
                json={"jobs": [{"task": "demo.echo"} for _ in range(10)]},
                headers=headers,
            )
            assert batch.status_code == 202
            arrivals += 10
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert arrivals == 1000
    assert len(seen) == len(set(seen))
    assert existing <= set(seen)
    assert _count(pg_engine) == 11_000


def test_list_filters_and_bad_cursor(client: TestClient, pg_engine: Engine) -> None:
    headers = new_key(pg_engine, "acme")
    client.post("/v1/jobs", json={"task": "demo.echo", "tags": ["blue"]}, headers=headers)
    client.post("/v1/jobs", json={"task": "demo.sleep", "payload": {"seconds": 1}}, headers=headers)
    blue = client.get("/v1/jobs", params={"tag": "blue"}, headers=headers).json()["items"]
    assert [j["tags"] for j in blue] == [["blue"]]
    sleeps = client.get("/v1/jobs", params={"task": "demo.sleep"}, headers=headers).json()
    assert [j["task"] for j in sleeps["items"]] == ["demo.sleep"]
    queued = client.get("/v1/jobs", params={"state": "queued"}, headers=headers).json()
    assert len(queued["items"]) == 2
    bad = client.get("/v1/jobs", params={"cursor": "nonsense!"}, headers=headers)
    assert bad.status_code == 422
    assert bad.headers["content-type"] == PROBLEM
    bad_state = client.get("/v1/jobs", params={"state": "sleeping"}, headers=headers)
    assert bad_state.status_code == 422


def test_fifty_concurrent_submits_with_one_key_make_one_job(
    client: TestClient, pg_engine: Engine
) -> None:
    headers = {**new_key(pg_engine, "acme"), "Idempotency-Key": "pay-7"}
    body = {"task": "demo.echo", "payload": {"amount": 7}}
    start = threading.Barrier(50)

    def submit(_: int) -> tuple[int, str | None]:
        start.wait(timeout=30)
        response = client.post("/v1/jobs", json=body, headers=headers)
        return response.status_code, response.json().get("id")

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(submit, range(50)))
    statuses = [status for status, _ in results]
    assert statuses.count(202) == 1
    assert set(statuses) <= {200, 202, 409}
    ids = {job_id for status, job_id in results if status in (200, 202)}
    assert len(ids) == 1
    assert _count(pg_engine) == 1
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 200
    assert again.json()["id"] in ids


def test_batch_is_all_or_nothing(client: TestClient, pg_engine: Engine) -> None:
    headers = new_key(pg_engine, "acme")
    bad = client.post(
        "/v1/jobs/batch",
        json={"jobs": [{"task": "demo.echo"}, {"task": "demo.sleep", "payload": {"seconds": -1}}]},
        headers=headers,
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["loc"][:3] == ["body", "jobs", 1]
    assert _count(pg_engine) == 0
    too_many = client.post(
        "/v1/jobs/batch", json={"jobs": [{"task": "demo.echo"}] * 1001}, headers=headers
    )
    assert too_many.status_code in (413, 422)
    assert _count(pg_engine) == 0
    good = client.post(
        "/v1/jobs/batch",
        json={"jobs": [{"task": "demo.echo", "payload": {"n": n}} for n in range(5)]},
        headers=headers,
    )
    assert good.status_code == 202
    assert [j["payload"]["n"] for j in good.json()["jobs"]] == list(range(5))


def test_cancel_and_retry_answer_409_in_the_wrong_state(
    client: TestClient, pg_engine: Engine
) -> None:
    headers = new_key(pg_engine, "acme")
    job_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=headers).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=headers).status_code == 409
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert cancelled.json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 409
    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=headers)
    assert retried.status_code == 200
    assert retried.json()["state"] == "queued"
    assert retried.json()["id"] == job_id


def test_rate_limit_answers_429_with_retry_after(
    pg_engine: Engine, pg_url: str, redis_url: str
) -> None:
    settings = Settings(
        database_url=pg_url, broker_url=redis_url, api_rate_per_second=1, api_rate_burst=3
    )
    platform = build_platform(settings)
    headers = new_key(pg_engine, "acme")
    with TestClient(create_app(platform.api_state())) as limited:
        statuses = [limited.get("/v1/task-types", headers=headers) for _ in range(5)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    assert statuses[-1].status_code == 429
    assert statuses[-1].headers["content-type"] == PROBLEM
    assert int(statuses[-1].headers["retry-after"]) >= 1


def test_stats_and_queues(client: TestClient, pg_engine: Engine) -> None:
    headers = new_key(pg_engine, "acme")
    done_id = client.post("/v1/jobs", json={"task": "demo.echo"}, headers=headers).json()["id"]
    sessions = make_session_factory(pg_engine)
    with sessions.begin() as session:
        store.claim(session, uuid.UUID(done_id), worker="t:1", lease_seconds=30)
        store.succeed(session, uuid.UUID(done_id), worker="t:1", token=1, result=None)
    client.post("/v1/jobs", json={"task": "demo.echo", "priority": "low"}, headers=headers)
    stats = client.get("/v1/stats", params={"window": "15m"}, headers=headers).json()
    assert stats["window_seconds"] == 900
    echo = next(item for item in stats["items"] if item["task"] == "demo.echo")
    assert echo["counts"] == {"succeeded": 1, "queued": 1}
    assert echo["run_seconds"]["p50"] is not None
    bad = client.get("/v1/stats", params={"window": "forever"}, headers=headers)
    assert bad.status_code == 422
    queues = {q["name"]: q for q in client.get("/v1/queues", headers=headers).json()["items"]}
    assert queues["low"]["queued"] == 1
    assert queues["low"]["depth"] == 1
    assert queues["default"]["queued"] == 0
