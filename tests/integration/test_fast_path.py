"""The one-statement claim on PostgreSQL stays on for task types without flow control."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine

from conveyor.config import Settings, TaskLimits
from conveyor.jobs import store
from conveyor.jobs.db import make_session_factory
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
