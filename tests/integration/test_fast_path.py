"""The one-statement claim on PostgreSQL stays on for task types without flow control."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine

from conveyor.config import Settings, TaskLimits
from conveyor.jobs import store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.fastpath import FastPath
from conveyor.jobs.states import JobState
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker.app import create_celery
from conveyor.worker.runtime import StoreHandle


def test_limits_on_one_task_type_leave_the_others_on_the_fast_path(
    pg_engine: Engine, pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        limits={"demo.sleep": TaskLimits(concurrency=1, key="tag:customer:")},
    )
    handle = StoreHandle(pg_url)
    executor = create_celery(settings, store_handle=handle).conveyor_executor
    fast = executor._fast_path
    assert fast is not None
    claimed: list[str] = []
    real = fast.claim

    def counted(*args: Any, **kwargs: Any) -> Any:
        job = real(*args, **kwargs)
        if job is not None:
            claimed.append(job.task)
        return job

    monkeypatch.setattr(fast, "claim", counted)
    sessions = make_session_factory(pg_engine)
    with sessions.begin() as session:
        echo = store.create_job(
            session, build_new_job(registry, tenant="a", task="demo.echo", payload={})
        )
        sleep = store.create_job(
            session,
            build_new_job(
                registry,
                tenant="a",
                task="demo.sleep",
                payload={"seconds": 0},
                tags=["customer:c"],
            ),
        )
    try:
        assert executor.run(echo.id).action == "ran-succeeded"
        assert executor.run(sleep.id).action == "ran-succeeded"
        assert executor.completer is not None and executor.completer.flush(10)
    finally:
        handle.dispose()
    # The limited job went through flow control (its limit key recorded), the other did not.
    assert claimed == ["demo.echo"]
    with sessions() as session:
        limited = store.get_job(session, sleep.id)
    assert limited is not None and limited.state is JobState.SUCCEEDED
    assert limited.limit_key == "customer:c"


def test_claims_use_a_generic_plan_that_looks_the_job_up_by_its_key(
    pg_engine: Engine, pg_url: str
) -> None:
    fast = FastPath(pg_url)
    # The table is nearly empty when the statement is first prepared, as on a new install.
    jobs = fast.record(
        [build_new_job(registry, tenant="a", task="demo.echo", payload={}) for _ in range(12)]
    )
    for job in jobs:
        assert fast.claim(job.id, worker="w:1", lease_seconds=60) is not None
    conn = fast._connection("claims")
    row = conn.execute(
        "SELECT name, generic_plans, parameter_types::text[] AS types"
        " FROM pg_prepared_statements WHERE statement LIKE '%%''claimed''%%'"
    ).fetchone()
    assert row is not None
    # Planning is paid a few times, not per claim.
    assert row["generic_plans"] >= 1
    # Then a backlog arrives; the plan made on the small table still finds rows by id.
    fast.record(
        [build_new_job(registry, tenant="a", task="demo.echo", payload={}) for _ in range(2000)]
    )
    values = {
        "uuid": f"'{jobs[0].id}'",
        "text": "'w:1'",
        "character varying": "'w:1'",
        "double precision": "60",
        "timestamp with time zone": "NULL",
        "text[]": "'{}'",
    }
    args = ", ".join(values[kind] for kind in row["types"])
    conn.execute("SET plan_cache_mode = force_generic_plan")
    plan = "\n".join(
        next(iter(r.values())) for r in conn.execute(f"EXPLAIN EXECUTE {row['name']}({args})")
    )
    fast.close()
    assert "Index Scan using pk_jobs on jobs" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan


def _events(sessions: Any, job_id: Any) -> list[tuple[str, str | None, str, Any]]:
    with sessions() as session:
        return [
            (e.event, e.from_state, e.to_state, e.detail)
            for e in store.list_events(session, job_id)
        ]


def test_a_finished_jobs_delivery_is_dropped_as_the_store_drops_it(
    pg_engine: Engine, pg_url: str
) -> None:
    fast = FastPath(pg_url)
    sessions = make_session_factory(pg_engine)
    done, waiting, by_store = fast.record(
        [build_new_job(registry, tenant="a", task="demo.echo", payload={}) for _ in range(3)]
    )
    for job in (done, by_store):
        claimed = fast.claim(job.id, worker="w:1", lease_seconds=60)
        assert claimed is not None
        assert fast.succeed(job.id, worker="w:1", token=claimed.lease_token, result=None)
    assert fast.drop_finished(done.id, worker="w:2") is JobState.SUCCEEDED
    # Not finished, or no such job: nothing noted, the claimer decides.
    assert fast.drop_finished(waiting.id, worker="w:2") is None
    assert fast.drop_finished(uuid.uuid4(), worker="w:2") is None
    with sessions.begin() as session:
        current = store.get_job(session, by_store.id)
        assert current is not None
        store.record_dropped_delivery(session, current, worker="w:2", reason="job is succeeded")
    fast.close()
    assert _events(sessions, done.id) == _events(sessions, by_store.id)
    assert _events(sessions, done.id)[-1] == (
        "delivery_dropped",
        "succeeded",
        "succeeded",
        {"reason": "job is succeeded"},
    )
    assert [e[0] for e in _events(sessions, waiting.id)] == ["created"]


def test_one_renewal_round_renews_the_held_and_keeps_the_stopping_windows(
    pg_engine: Engine, pg_url: str
) -> None:
    fast = FastPath(pg_url)
    sessions = make_session_factory(pg_engine)
    held, stale, stopping = fast.record(
        [build_new_job(registry, tenant="a", task="demo.echo", payload={}) for _ in range(3)]
    )
    runs = {}
    for job in (held, stale, stopping):
        claimed = fast.claim(job.id, worker="w:1", lease_seconds=5)
        assert claimed is not None
        runs[job.id] = claimed.lease_token
    with sessions.begin() as session:
        # The stopping run's job was cancelled while it ran; it still holds a lease.
        assert store.cancel(session, stopping.id) is not None
        before = {j: store.get_job(session, j) for j in runs}
    still = fast.renew(
        [(held.id, runs[held.id]), (stale.id, runs[stale.id] + 1)],
        [(stopping.id, runs[stopping.id])],
        lease_seconds=600,
    )
    fast.close()
    # The stale token (a newer run would hold it) is not renewed, and is reported lost.
    assert still == {(held.id, runs[held.id])}
    with sessions() as session:
        after = {j: store.get_job(session, j) for j in runs}
    for job_id, renewed in ((held.id, True), (stale.id, False), (stopping.id, True)):
        old, new = before[job_id], after[job_id]
        assert old is not None and new is not None
        assert old.lease_expires_at is not None and new.lease_expires_at is not None
        assert (new.lease_expires_at > old.lease_expires_at) is renewed, job_id
