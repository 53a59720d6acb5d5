"""`GET /v1/jobs/{id}?wait=S` on the real API and store: many waiters, one query per poll."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from conveyor.api.app import create_app
from conveyor.api.state import ApiState
from conveyor.cli.wiring import Platform, build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, store
from conveyor.jobs.db import make_session_factory
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

WAITERS = 200


@pytest.fixture
def platform(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[Platform]:
    settings = Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    made = build_platform(settings)
    yield made
    made.store.dispose()


def _key(engine: Engine, tenant: str = "acme") -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant)
    return {"Authorization": f"Bearer {key}"}


def _queued(engine: Engine, count: int) -> list[str]:
    with make_session_factory(engine).begin() as session:
        made = store.create_jobs(
            session,
            [
                build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n})
                for n in range(count)
            ],
        )
    return [str(job.id) for job in made]


def _finish(engine: Engine, job_ids: list[str]) -> None:
    sessions = make_session_factory(engine)
    for job_id in job_ids:
        with sessions.begin() as session:
            claimed = store.claim(session, uuid.UUID(job_id), worker="w:1", lease_seconds=30)
            assert claimed is not None
            store.succeed(
                session, claimed.id, worker="w:1", token=claimed.lease_token, result={"ok": 1}
            )


def test_many_waiters_are_answered_by_one_query_per_poll(
    platform: Platform, pg_engine: Engine
) -> None:
    headers = _key(pg_engine)
    ids = _queued(pg_engine, WAITERS)
    state: ApiState = platform.api_state()
    app = create_app(state)
    api_engine = platform.sessions.kw["bind"]
    sent: list[str] = []
    counted: list[int] = []
    lock = threading.Lock()

    def record(*args: Any) -> None:
        with lock:
            sent.append(" ".join(str(args[2]).split()))

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            waiting = [
                asyncio.ensure_future(client.get(f"/v1/jobs/{i}?wait=30", headers=headers))
                for i in ids
            ]
            deadline = asyncio.get_running_loop().time() + 20
            while state.waiters.count() < WAITERS:
                assert asyncio.get_running_loop().time() < deadline, "the waiters registered"
                await asyncio.sleep(0.01)
            event.listen(api_engine, "before_cursor_execute", record)
            polls = state.waiters.polls
            while state.waiters.polls < polls + 20:
                await asyncio.sleep(0.01)
            event.remove(api_engine, "before_cursor_execute", record)
            counted.append(state.waiters.polls - polls)
            await asyncio.to_thread(_finish, pg_engine, ids)
            return await asyncio.gather(*waiting)

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * WAITERS
    assert {a.json()["state"] for a in answers} == {"succeeded"}
    # While 200 requests waited, the API asked the store one query per poll (give or
    # take the poll under way when counting began or ended).
    [polls] = counted
    assert polls >= 20
    assert polls - 1 <= len(sent) <= polls + 1, (polls, len(sent))
    assert all(s.startswith("SELECT jobs.id, ") and " WHERE jobs.id IN " in s for s in sent), sent[
        :2
    ]


def test_wait_answers_a_finished_job_at_once_and_a_slow_one_with_its_state(
    platform: Platform, pg_engine: Engine
) -> None:
    headers = _key(pg_engine)
    other = _key(pg_engine, tenant="other")
    first, second = _queued(pg_engine, 2)
    _finish(pg_engine, [first])
    with TestClient(create_app(platform.api_state())) as client:
        done = client.get(f"/v1/jobs/{first}?wait=60", headers=headers)
        assert (done.status_code, done.json()["state"]) == (200, "succeeded")
        # Not finished within the wait: its current state.
        still = client.get(f"/v1/jobs/{second}?wait=0.2", headers=headers)
        assert (still.status_code, still.json()["state"]) == (200, "queued")
        assert client.get(f"/v1/jobs/{second}?wait=0.2", headers=other).status_code == 404
        for bad in ("61", "-1", "soon"):
            refused = client.get(f"/v1/jobs/{second}?wait={bad}", headers=headers)
            assert refused.status_code == 422, bad
            assert refused.headers["content-type"].startswith("application/problem+json")
