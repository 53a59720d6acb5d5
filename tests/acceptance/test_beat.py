"""Two beat processes: one leads, exactly one job per tick, failover, live schedule changes."""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import jobs, leases
from tests import workers
from tests.support import wait_until


@pytest.fixture
def api(pg_engine: Engine, pg_url: str, redis_url: str) -> Iterator[tuple[TestClient, dict]]:
    platform = build_platform(
        Settings(database_url=pg_url, broker_url=redis_url, api_rate_per_second=0)
    )
    with make_session_factory(pg_engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    with TestClient(create_app(platform.api_state())) as client:
        yield client, {"Authorization": f"Bearer {key}"}
    platform.store.dispose()


def ticks(engine: Engine) -> list[dt.datetime]:
    with engine.connect() as conn:
        return [
            t
            for (t,) in conn.execute(
                select(jobs.c.schedule_tick)
                .where(jobs.c.schedule_id.is_not(None))
                .order_by(jobs.c.schedule_tick)
            )
        ]


def holder(engine: Engine) -> str | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(leases.c.holder, leases.c.expires_at).where(leases.c.name == "beat")
        ).first()
    if row is None or row.expires_at < dt.datetime.now(dt.UTC):
        return None
    return str(row.holder)


def test_two_beats_fire_each_tick_once_and_fail_over(
    api: tuple[TestClient, dict], pg_engine: Engine, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    client, headers = api
    env = workers.service_env(pg_url, redis_url)
    beats = {name: workers.start(["beat"], env, tmp_path / f"{name}.log") for name in ("a", "b")}
    try:
        wait_until(lambda: holder(pg_engine), timeout=60, what="a beat to lead")
        created = client.post(
            "/v1/schedules",
            json={"name": "every-5s", "task": "demo.echo", "interval_seconds": 5},
            headers=headers,
        )
        assert created.status_code == 201
        started = time.monotonic()
        first_tick = dt.datetime.fromisoformat(created.json()["next_run_at"])
        # Mid-run, kill whichever beat leads; the other must take over within 15 s.
        wait_until(
            lambda: time.monotonic() - started > 40,
            timeout=60,
            interval=1,
            what="the middle of the run",
        )
        leader = holder(pg_engine)
        assert leader is not None
        pid = int(leader.rsplit(":", 1)[1])
        victim = next(n for n, p in beats.items() if p.pid == pid)
        beats[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        successor = wait_until(
            lambda: (h := holder(pg_engine)) and h != leader and h,
            timeout=20,
            interval=0.2,
            what="the standby to take over",
        )
        takeover = time.monotonic() - killed_at
        assert takeover < 15
        assert successor != leader
        wait_until(
            lambda: time.monotonic() - started >= 90, timeout=110, interval=1, what="ninety seconds"
        )
        fired = ticks(pg_engine)
        print(f"\njobs in 90 s: {len(fired)}, takeover after kill: {takeover:.1f} s")
        assert 16 <= len(fired) <= 19
        assert len(set(fired)) == len(fired)
        assert fired[0] == first_tick
        assert {(b - a).total_seconds() for a, b in itertools.pairwise(fired)} == {5.0}
    finally:
        for process in beats.values():
            workers.stop(process)


def test_schedule_changes_apply_within_ten_seconds(
    api: tuple[TestClient, dict], pg_engine: Engine, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    client, headers = api
    beat = workers.start(["beat"], workers.service_env(pg_url, redis_url), tmp_path / "beat.log")
    try:
        wait_until(lambda: holder(pg_engine), timeout=60, what="beat to lead")
        client.post(
            "/v1/schedules",
            json={"name": "fast", "task": "demo.echo", "interval_seconds": 1},
            headers=headers,
        )
        wait_until(lambda: len(ticks(pg_engine)) >= 3, timeout=15, what="ticks to fire")
        paused = client.patch("/v1/schedules/fast", json={"enabled": False}, headers=headers)
        assert paused.status_code == 200
        paused_at = dt.datetime.now(dt.UTC)
        count = len(ticks(pg_engine))
        wait_until(
            lambda: time.monotonic() > 0 and _stable(pg_engine, count, 4),
            timeout=15,
            what="no new ticks while paused",
        )
        assert all(t <= paused_at + dt.timedelta(seconds=1) for t in ticks(pg_engine))
        resumed = client.patch(
            "/v1/schedules/fast", json={"enabled": True, "interval_seconds": 2}, headers=headers
        )
        assert resumed.status_code == 200
        before = len(ticks(pg_engine))
        wait_until(
            lambda: len(ticks(pg_engine)) >= before + 2,
            timeout=10,
            what="the resumed schedule to fire within 10 s",
        )
        newer = [t for t in ticks(pg_engine) if t > paused_at]
        assert {(b - a).total_seconds() for a, b in itertools.pairwise(newer)} <= {2.0}
        runs = client.get("/v1/schedules/fast", headers=headers).json()["recent_runs"]
        assert runs and all(r["state"] == "queued" for r in runs)
    finally:
        workers.stop(beat)


def _stable(engine: Engine, count: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(ticks(engine)) > count + 1:
            return False
        time.sleep(0.5)
    return True
