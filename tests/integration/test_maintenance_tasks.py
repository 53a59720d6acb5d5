"""conveyor.aggregate and conveyor.cleanup: scheduled, doing their work, read by the API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, rollups, store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import job_rollups, jobs
from conveyor.worker.app import AGGREGATE_TASK, CLEANUP_TASK, create_celery
from conveyor.worker.runtime import StoreHandle
from tests.integration.job_rows import forget_rollups, insert_jobs, job_row


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> Iterator[sessionmaker[Session]]:
    factory = make_session_factory(pg_engine)
    forget_rollups(factory)
    yield factory
    forget_rollups(factory)


def test_beat_runs_aggregate_and_cleanup_on_the_store(
    pg_url: str, pg_sessions: sessionmaker[Session]
) -> None:
    settings = Settings(
        database_url=pg_url,
        aggregate_interval_seconds=7,
        cleanup_interval_seconds=120,
        retention_finished_days=2,
    )
    handle = StoreHandle(pg_url)
    app = create_celery(settings, store_handle=handle)
    try:
        # Maintenance is no message on any queue: the beat leader runs it in-process.
        assert not app.conf.beat_schedule
        chores = {c.name: c for lane in app.conveyor_maintainer._lanes for c in lane}
        assert chores[AGGREGATE_TASK].interval == 7
        assert chores[CLEANUP_TASK].interval == 120

        now = store.utcnow()
        recent = now - dt.timedelta(minutes=3)
        old = now - dt.timedelta(days=3)
        insert_jobs(
            pg_sessions,
            [
                job_row(
                    state="succeeded", created_at=recent, started_at=recent, finished_at=recent
                ),
                job_row(state="succeeded", created_at=old, started_at=old, finished_at=old),
            ],
        )
        # Called directly, a task runs its body here, as a worker would: the first run
        # rolls up the old job's hour, the next skips to the recent one.
        assert [app.tasks[AGGREGATE_TASK]() for _ in range(2)] == [1, 1]
        with pg_sessions() as session:
            rolled = session.execute(select(func.count()).select_from(job_rollups)).scalar_one()
        assert rolled == 2
        assert app.tasks[CLEANUP_TASK]() == {"finished": 1, "dead": 0, "rollups": 0, "anomalies": 0}
        with pg_sessions() as session:
            left = session.execute(select(jobs.c.finished_at)).scalars().all()
        assert left == [recent]
    finally:
        handle.dispose()


def test_stats_route_reads_the_rollups(pg_url: str, pg_sessions: sessionmaker[Session]) -> None:
    settings = Settings(database_url=pg_url, api_rate_per_second=0)
    platform = build_platform(settings)
    with pg_sessions.begin() as session:
        key, _ = keys.create_key(session, tenant="acme", scopes=("read",))
    headers = {"Authorization": f"Bearer {key}"}
    now = store.utcnow()
    rolled = [
        finished_row("succeeded", now - dt.timedelta(minutes=m), run_seconds=float(m))
        for m in range(10, 30)
    ] + [finished_row("dead", now - dt.timedelta(minutes=12), run_seconds=1.0)]
    insert_jobs(pg_sessions, rolled)
    try:
        with pg_sessions.begin() as session:
            assert rollups.aggregate(session, now=now) > 0
        # The raw rows may go (retention); the rollups still answer for them.
        with pg_sessions.begin() as session:
            session.execute(delete(jobs))
        insert_jobs(pg_sessions, [finished_row("succeeded", store.utcnow(), run_seconds=0.5)])
        with TestClient(create_app(platform.api_state())) as client:
            hour = client.get("/v1/stats", params={"window": "1h"}, headers=headers).json()
            recent = client.get("/v1/stats", params={"window": "5m"}, headers=headers).json()
    finally:
        platform.store.dispose()
    (echo,) = hour["items"]
    assert echo["counts"] == {"succeeded": 21, "dead": 1}
    # Run times 0.5 and 10..29 s: merged from histograms, within a 10 % bucket.
    assert echo["run_seconds"]["p50"] == pytest.approx(19.0, rel=0.1)
    assert echo["run_seconds"]["p99"] == pytest.approx(29.0, rel=0.1)
    (fresh,) = recent["items"]
    assert fresh["counts"] == {"succeeded": 1}
    assert fresh["run_seconds"] == {"p50": 0.5, "p95": 0.5, "p99": 0.5}


def finished_row(state: str, at: dt.datetime, *, run_seconds: float) -> dict[str, Any]:
    started = at - dt.timedelta(seconds=run_seconds)
    return job_row(state=state, created_at=started, started_at=started, finished_at=at)
