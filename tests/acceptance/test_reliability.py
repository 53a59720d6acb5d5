"""Nothing accepted is lost and nothing runs twice: kills, restarts, cancels, shutdowns.

Each test runs on Redis and on RabbitMQ, with real worker and beat processes.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, select

from conveyor.jobs.tables import job_events
from tests.acceptance import services
from tests.acceptance.cluster import Cluster, Receiver, cluster_context, kill_until, report
from tests.pgbouncer import POOL_SIZE, Bouncer, pgbouncer
from tests.support import wait_until


@pytest.fixture
def cluster(pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from cluster_context(
        pg_url, broker_url, pg_engine, tmp_path, ["high-1", "default-1", "default-2"]
    )


@pytest.fixture
def default_only(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    """API, beat and two `--pool default` workers: no `high` worker runs maintenance."""
    yield from cluster_context(pg_url, broker_url, pg_engine, tmp_path, ["default-1", "default-2"])


@pytest.fixture
def small_cluster(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    yield from cluster_context(pg_url, broker_url, pg_engine, tmp_path, ["high-1", "default-1"])


@pytest.fixture
def through_pgbouncer(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[tuple[Cluster, Bouncer]]:
    """The default-pool cluster with every process's database connections through
    PgBouncer in transaction mode (the test's own reads go straight to PostgreSQL)."""
    with pgbouncer() as bouncer:
        for cluster in cluster_context(
            bouncer.url_for(pg_url),
            broker_url,
            pg_engine,
            tmp_path,
            ["default-1", "default-2"],
            pooler="transaction",
        ):
            yield cluster, bouncer


def test_kills_lose_nothing_and_never_overlap(default_only: Cluster) -> None:
    # Only the default pool is served: rescue and relay must not depend on any pool.
    kills_lose_nothing(default_only, "kills, default pool only")


def test_kills_through_pgbouncer_in_transaction_mode(
    through_pgbouncer: tuple[Cluster, Bouncer],
) -> None:
    cluster, bouncer = through_pgbouncer
    kills_lose_nothing(cluster, "kills, through PgBouncer (transaction mode)")
    pools = [p for p in bouncer.pools() if p["database"] != "pgbouncer"]
    servers = sum(int(p["sv_active"]) + int(p["sv_idle"]) + int(p["sv_used"]) for p in pools)
    assert 0 < servers <= POOL_SIZE, pools


def kills_lose_nothing(cluster: Cluster, label: str) -> None:
    """500 jobs while workers are killed and restarted: all succeed, none overlaps."""
    rng = random.Random(7)
    with Receiver() as receiver:
        hooks = []
        for n in range(500):
            if n % 5 < 2:
                job = cluster.submit(
                    {"task": "webhook.deliver", "payload": {"url": receiver.url, "body": {"n": n}}}
                )
                hooks.append(job["id"])
            else:
                cluster.submit(
                    {"task": "demo.sleep", "payload": {"seconds": rng.uniform(0.05, 0.4)}}
                )

        def all_finished() -> bool:
            states = cluster.states()
            return sum(states.get(s, 0) for s in ("succeeded", "dead", "cancelled")) == 500

        kills = kill_until(cluster, rng, all_finished, at_least=10, at_most=24)
        states = cluster.wait_all_finished(500, timeout=120)
        assert kills >= 10
        assert states == {"succeeded": 500}
        keys = {d.key for d in receiver.deliveries}
        assert keys == set(hooks)
        overlaps = receiver.overlaps()
        assert overlaps == [], [(pair, cluster.events_of(pair[0].key)) for pair in overlaps]
        assert cluster.overlapping_runs() == 0
        stuck = cluster.states().get("running", 0)
        report(
            test=label,
            broker=cluster.broker_url.split(":")[0],
            jobs=500,
            kills=kills,
            restarts=cluster.restarts,
            lost=500 - states.get("succeeded", 0),
            stuck=stuck,
            overlapping_store=cluster.overlapping_runs(),
            overlapping_receiver=receiver.overlapping(),
            deliveries=len(receiver.deliveries),
        )


@pytest.mark.parametrize("what", ["broker", "database"])
def test_restarts_mid_run_lose_nothing(cluster: Cluster, what: str) -> None:
    ids = [
        cluster.submit({"task": "demo.sleep", "payload": {"seconds": 0.2}})["id"]
        for _ in range(100)
    ]
    wait_until(
        lambda: cluster.states().get("succeeded", 0) >= 10, timeout=60, what="the run to start"
    )
    if what == "broker":
        services.stop_broker(cluster.broker_url)
        time.sleep(2)  # the outage itself: workers see the broker gone
        services.start_broker(cluster.broker_url)
    else:
        services.restart_postgres()
    states = cluster.wait_all_finished(len(ids), timeout=180)
    assert states == {"succeeded": 100}
    assert cluster.overlapping_runs() == 0
    alive = [name for name, p in cluster.processes.items() if p.poll() is None]
    assert sorted(alive) == sorted(cluster.processes)
    report(
        test=f"{what}-restart",
        broker=cluster.broker_url.split(":")[0],
        jobs=100,
        lost=100 - states.get("succeeded", 0),
        overlapping_store=cluster.overlapping_runs(),
    )


def test_submit_while_broker_is_down(small_cluster: Cluster) -> None:
    services.stop_broker(small_cluster.broker_url)
    try:
        started = time.monotonic()
        job = small_cluster.submit({"task": "demo.echo", "payload": {"down": True}})
        assert time.monotonic() - started < 10
        assert job["state"] == "queued"
    finally:
        services.start_broker(small_cluster.broker_url)
    done = wait_until(
        lambda: (j := small_cluster.job(job["id"]))["state"] == "succeeded" and j,
        timeout=120,
        interval=0.5,
        what="the job accepted while the broker was down to run",
    )
    assert done["result"] == {"down": True}


def test_dead_letters_and_replay(small_cluster: Cluster) -> None:
    with Receiver() as receiver:
        job = small_cluster.submit(
            {"task": "demo.fail", "payload": {"failures": 10}, "max_attempts": 3}
        )
        dead = wait_until(
            lambda: (j := small_cluster.job(job["id"]))["state"] == "dead" and j,
            timeout=60,
            interval=0.2,
            what="the failing job to go dead",
        )
        assert dead["attempts"] == 3
        assert receiver.deliveries == []
    with small_cluster.engine.connect() as conn:
        history = conn.execute(
            select(job_events.c.event, job_events.c.detail)
            .where(job_events.c.job_id == job["id"])
            .order_by(job_events.c.id)
        ).all()
    delays = [d["retry_in_seconds"] for e, d in history if e == "failed"]
    assert len(delays) == 2 and delays[1] > delays[0]
    assert history[-1][0] == "dead"
    assert small_cluster.client is not None
    listing = small_cluster.client.get(
        "/v1/dead-letters", params={"task": "demo.fail"}, headers=small_cluster.headers()
    ).json()
    assert [item["id"] for item in listing["items"]] == [job["id"]]
    assert listing["groups"][0]["count"] == 1
    assert listing["groups"][0]["error_type"] == "conveyor.tasks.demo.InjectedFailure"
    replay = small_cluster.client.post(
        "/v1/dead-letters/replay", json={"ids": [job["id"]]}, headers=small_cluster.headers()
    )
    assert replay.json() == {"replayed": 1}
    wait_until(
        lambda: (
            small_cluster.job(job["id"])["attempts"] >= 1
            and small_cluster.job(job["id"])["state"] in ("running", "retrying", "dead")
        ),
        timeout=30,
        interval=0.2,
        what="the replayed job to run again",
    )
    with small_cluster.engine.connect() as conn:
        claims = conn.execute(
            select(job_events.c.id).where(
                job_events.c.job_id == job["id"], job_events.c.event == "claimed"
            )
        ).all()
    assert len(claims) >= 4


def test_cancel_running_job_stops_it(small_cluster: Cluster) -> None:
    job = small_cluster.submit({"task": "demo.sleep", "payload": {"seconds": 120}})
    wait_until(
        lambda: small_cluster.job(job["id"])["state"] == "running",
        timeout=60,
        interval=0.1,
        what="the sleep to start",
    )
    assert small_cluster.client is not None
    started = time.monotonic()
    response = small_cluster.client.post(
        f"/v1/jobs/{job['id']}/cancel", headers=small_cluster.headers()
    )
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    # Both slots of the pool serve the next jobs: the cancelled run has let go of its slot.
    followers = [
        small_cluster.submit({"task": "demo.sleep", "payload": {"seconds": 1}})["id"]
        for _ in range(2)
    ]
    wait_until(
        lambda: all(small_cluster.job(f)["state"] == "running" for f in followers),
        timeout=5,
        interval=0.05,
        what="both slots to run the next jobs within 5 s of the cancel",
    )
    assert time.monotonic() - started < 5
    assert small_cluster.job(job["id"])["state"] == "cancelled"
    again = small_cluster.client.post(
        f"/v1/jobs/{job['id']}/cancel", headers=small_cluster.headers()
    )
    assert again.status_code == 409


def test_sigterm_lets_a_running_job_finish_once(small_cluster: Cluster) -> None:
    job = small_cluster.submit({"task": "demo.sleep", "payload": {"seconds": 3}})
    wait_until(
        lambda: small_cluster.job(job["id"])["state"] == "running",
        timeout=60,
        interval=0.05,
        what="the 3-second job to start",
    )
    worker = small_cluster.processes["default-1"]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) is not None
    done = wait_until(
        lambda: (j := small_cluster.job(job["id"]))["state"] == "succeeded" and j,
        timeout=30,
        interval=0.1,
        what="the job to complete",
    )
    assert done["attempts"] == 1
    assert done["result"]["slept"] >= 3
    with small_cluster.engine.connect() as conn:
        events = [
            e
            for (e,) in conn.execute(
                select(job_events.c.event)
                .where(job_events.c.job_id == job["id"])
                .order_by(job_events.c.id)
            )
        ]
    # A publish that timed out on a busy machine may still have reached the broker; its
    # duplicate is dropped at claim (and recorded). The job itself ran once.
    ran = [e for e in events if e != "delivery_dropped"]
    assert ran == ["created", "claimed", "succeeded"]
    if small_cluster.broker_url.startswith("redis"):
        client = redis.Redis.from_url(small_cluster.broker_url)
        assert client.llen("default") == 0
