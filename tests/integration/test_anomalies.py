"""Anomaly detection end to end: jobs, the real aggregation task body, episodes, the API.

Two task types finish 30 jobs a minute for 70 minutes, one in ten dead, with the same
run times and queue waits throughout; then one of them fails six jobs in ten for five
minutes. `aggregate_once` (the body of `conveyor.aggregate`) runs under a controlled
clock; `GET /v1/stats/anomalies` must name the bursting task type and not the steady one,
the warning must be logged once however many runs see the episode, and the episode must
end once the window is steady again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import anomalies, db, keys, rollups, store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import anomalies as anomalies_table
from conveyor.worker.maintenance import aggregate_once
from conveyor.worker.runtime import StoreHandle
from tests.integration.job_rows import insert_jobs, job_row

PROBLEM = "application/problem+json"
STEADY, BURSTY = "demo.echo", "webhook.deliver"
JOBS_PER_MINUTE = 30
LOGGER = "conveyor.jobs.anomalies"


def minute_of_jobs(
    tenant: str, task: str, start: dt.datetime, *, dead_in_ten: int
) -> list[dict[str, Any]]:
    """One minute of finished jobs: `dead_in_ten` of every ten dead, the rest succeeded.

    Run times (0.20 to 0.24 s) and queue waits (50 to 70 ms) repeat the same way each
    minute, so a steady task type's minutes are alike.
    """
    rows = []
    for i in range(JOBS_PER_MINUTE):
        finished = start + dt.timedelta(seconds=1.5 * i + 0.5)
        started = finished - dt.timedelta(seconds=0.2 + 0.01 * (i % 5))
        scheduled = started - dt.timedelta(seconds=0.05 + 0.005 * (i % 5))
        rows.append(
            job_row(
                state="dead" if i % 10 < dead_in_ten else "succeeded",
                tenant=tenant,
                task=task,
                created_at=scheduled,
                scheduled_at=scheduled,
                started_at=started,
                finished_at=finished,
            )
        )
    return rows


def history(
    start: dt.datetime, minutes: range, *, bursty_minutes: range = range(0)
) -> list[dict[str, Any]]:
    """Both task types of acme, and the bursty one of globex, over `minutes` from `start`."""
    rows = []
    for m in minutes:
        at = start + m * rollups.MINUTE
        rows += minute_of_jobs("acme", STEADY, at, dead_in_ten=1)
        rows += minute_of_jobs("acme", BURSTY, at, dead_in_ten=6 if m in bursty_minutes else 1)
        rows += minute_of_jobs("globex", BURSTY, at, dead_in_ten=1)
    return rows


class Clock:
    """The time the store's clocks (`store.utcnow`, the maintenance's `db_now`) answer."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Ten seconds past a whole minute, so the minute before is complete past the lag."""
    held = Clock(rollups.floor_minute(store.utcnow()) + dt.timedelta(seconds=10))
    monkeypatch.setattr(store, "utcnow", held)
    # The chores read the clock through the module (maintenance loads it lazily).
    monkeypatch.setattr(db, "db_now", lambda _session: held())
    return held


@pytest.fixture
def handle(pg_engine: Engine, pg_url: str) -> Iterator[StoreHandle]:
    store_handle = StoreHandle(pg_url)
    yield store_handle
    store_handle.dispose()


def auth(engine: Engine, tenant: str, scopes: tuple[str, ...] = ("read",)) -> dict[str, str]:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant, scopes=scopes)
    return {"Authorization": f"Bearer {key}"}


def listed(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/v1/stats/anomalies", headers=headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def started_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def ended_infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO
    ]


def episodes(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(anomalies_table).order_by(anomalies_table.c.started_at))
        return [dict(r) for r in rows.mappings()]


def test_a_burst_of_failures_is_listed_logged_once_and_ends(
    pg_engine: Engine,
    handle: StoreHandle,
    client: TestClient,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    now_minute = rollups.floor_minute(clock.at)
    start = now_minute - 70 * rollups.MINUTE
    # Seventy steady minutes, the last five of them a burst for acme's bursty task type.
    insert_jobs(handle.sessions(), history(start, range(70), bursty_minutes=range(65, 70)))
    acme, globex = auth(pg_engine, "acme"), auth(pg_engine, "globex")

    # The first run rolls up an hour and is too far behind to judge; the second catches up.
    assert aggregate_once(handle) > 0
    assert episodes(pg_engine) == []
    assert aggregate_once(handle) > 0
    with handle.sessions()() as session:
        assert rollups.watermark(session) == now_minute

    [item] = listed(client, acme)
    assert (item["task"], item["signal"]) == (BURSTY, "failure_rate")
    assert item["value"] == pytest.approx(0.6)
    assert item["baseline"] == pytest.approx(0.1)
    assert item["score"] >= anomalies.Limits().open_score
    assert item["started_at"] == item["last_seen_at"]
    # The steady task type is not listed, and globex's bursty one was steady; both were
    # judged, not passed over for want of data.
    assert listed(client, globex) == []
    with handle.sessions()() as session:
        series = anomalies.load_minutes(session, end=now_minute, minutes=65)
    for tenant, task in (("acme", STEADY), ("globex", BURSTY)):
        verdicts = anomalies.score_task(series[(tenant, task)], anomalies.Limits())
        assert {v.score for v in verdicts.values()} == {0.0}, (tenant, task)
        assert set(verdicts) == set(anomalies.Signal)
    [warning] = started_warnings(caplog)
    for part in ("tenant=acme", f"task={BURSTY}", "signal=failure_rate", "value=0.6"):
        assert part in warning
    assert "baseline=0.1" in warning and "score=" in warning
    with handle.sessions()() as session:
        assert anomalies.open_anomalies(session) == [(BURSTY, "failure_rate")]
    # And as a gauge on the API's /metrics, for alerts.
    flagged = {
        (sample.labels["task"], sample.labels["signal"], sample.value)
        for family in text_string_to_metric_families(client.get("/metrics").text)
        if family.name == "conveyor_anomaly"
        for sample in family.samples
    }
    assert flagged == {(BURSTY, "failure_rate", 1.0)}

    # Later runs over the same burst carry the episode on without logging it again.
    clock.at += dt.timedelta(seconds=15)
    aggregate_once(handle)
    clock.at += dt.timedelta(seconds=50)
    insert_jobs(handle.sessions(), history(start, range(70, 71)))
    aggregate_once(handle)
    assert len(started_warnings(caplog)) == 1
    [open_one] = episodes(pg_engine)
    assert open_one["ended_at"] is None
    assert open_one["last_seen_at"] == clock.at
    # The window now holds four minutes of the burst and one steady minute: 75 of 150 dead.
    assert open_one["value"] == pytest.approx(0.5)
    [item] = listed(client, acme)
    assert item["value"] == pytest.approx(0.5)
    seen, began = (dt.datetime.fromisoformat(item[k]) for k in ("last_seen_at", "started_at"))
    assert seen - began == dt.timedelta(seconds=65)

    # Five steady minutes later the window is steady again: the episode ends, once.
    insert_jobs(handle.sessions(), history(start, range(71, 76)))
    clock.at += 5 * rollups.MINUTE
    aggregate_once(handle)
    assert listed(client, acme) == []
    [closed] = episodes(pg_engine)
    assert closed["ended_at"] == clock.at
    [ended] = ended_infos(caplog)
    assert f"task={BURSTY}" in ended and "signal=failure_rate" in ended
    clock.at += dt.timedelta(seconds=15)
    aggregate_once(handle)
    assert len(episodes(pg_engine)) == 1
    assert len(started_warnings(caplog)) == 1 and len(ended_infos(caplog)) == 1
    with handle.sessions()() as session:
        assert anomalies.open_anomalies(session) == []


def test_anomalies_need_the_read_scope_and_a_key(client: TestClient, pg_engine: Engine) -> None:
    submit_only = auth(pg_engine, "acme", ("submit",))
    for headers in ({}, {"Authorization": "Bearer cvk_nope"}, submit_only):
        response = client.get("/v1/stats/anomalies", headers=headers)
        assert response.status_code in (401, 403)
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["status"] == response.status_code
    assert client.get("/v1/stats/anomalies", headers=submit_only).status_code == 403


def detect(sessions: sessionmaker[Session], now: dt.datetime) -> anomalies.Detection:
    with sessions.begin() as session:
        rollups.aggregate(session, now=now)
    with sessions.begin() as session:
        return anomalies.detect(session, now=now)


def test_an_episode_whose_jobs_stop_ends_when_stale(sessions: sessionmaker[Session]) -> None:
    """On SQLite and PostgreSQL: opened once, kept while unmeasured, then ended."""
    limits = anomalies.Limits()
    start = dt.datetime(2030, 1, 1, 10, 0, tzinfo=dt.UTC)
    insert_jobs(sessions, history(start, range(70), bursty_minutes=range(65, 70)))
    now = start + 70 * rollups.MINUTE + dt.timedelta(seconds=10)
    with sessions.begin() as session:
        rollups.aggregate(session, now=now)  # the first hour: too far behind to judge
    assert detect(sessions, now) == anomalies.Detection(opened=1)
    assert detect(sessions, now) == anomalies.Detection(ongoing=1)

    # No more jobs: once the window is empty there is nothing to score; the episode waits.
    quiet = now + 6 * rollups.MINUTE
    assert detect(sessions, quiet) == anomalies.Detection(ongoing=1)
    stale = now + limits.stale_minutes * rollups.MINUTE
    assert detect(sessions, stale) == anomalies.Detection(ended=1)
    with sessions() as session:
        assert anomalies.open_episodes(session) == []
        assert anomalies.open_anomalies(session) == []
        [row] = session.execute(select(anomalies_table)).mappings().all()
    assert (row["tenant"], row["task"], row["signal"]) == ("acme", BURSTY, "failure_rate")
    assert (row["started_at"], row["last_seen_at"], row["ended_at"]) == (now, now, stale)


def test_nothing_is_judged_before_aggregation_or_while_it_lags(
    sessions: sessionmaker[Session],
) -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, 10, tzinfo=dt.UTC)
    with sessions.begin() as session:
        assert anomalies.detect(session, now=now) == anomalies.Detection()
        rollups.set_watermark(session, now - 10 * rollups.MINUTE)
    with sessions.begin() as session:
        assert anomalies.detect(session, now=now) == anomalies.Detection()
