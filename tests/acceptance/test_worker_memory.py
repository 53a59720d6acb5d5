"""A worker loads SQLAlchemy only when a job needs more than the fast path: real processes.

Jobs claimed and finished on the fast path (lease renewals included) leave SQLAlchemy
unloaded in the worker's main process and its pool children, which fork from it and hold
whatever it loaded; the first job that fails loads it in the child running it, and its
retries and its end are recorded as before. SQLAlchemy's compiled modules show in a
process's memory map, so the test reads /proc/<pid>/maps from outside.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from conveyor.worker.maintenance import EPOCH_KEY
from tests.acceptance.cluster import BROKERS, Cluster, cluster_context
from tests.support import wait_until


def maps_sqlalchemy(pid: int) -> bool:
    """Whether one of SQLAlchemy's compiled modules is mapped into process `pid`."""
    with open(f"/proc/{pid}/maps") as maps:
        return any("/sqlalchemy/" in line for line in maps)


@pytest.fixture
def one_worker(pg_engine: Engine, pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from cluster_context(pg_url, BROKERS["redis"], pg_engine, tmp_path, ["default-1"])


def test_the_fast_path_leaves_sqlalchemy_unloaded_until_a_job_fails(
    one_worker: Cluster,
) -> None:
    # This process loaded SQLAlchemy: its compiled modules are there to be seen.
    assert maps_sqlalchemy(os.getpid())
    cluster = one_worker
    # Beat republishes every queued job when it finds the broker new (no epoch mark yet):
    # the duplicates would go through the claimer. Wait for its first look.
    broker = redis.Redis.from_url(cluster.broker_url)
    wait_until(lambda: broker.exists(EPOCH_KEY), timeout=30, what="beat's look at the broker")
    # Two sleeps outlast several renewal rounds (heartbeat 0.5 s), on both children.
    ids = [cluster.submit({"task": "demo.sleep", "payload": {"seconds": 2}})["id"] for _ in "ab"]
    ids += [cluster.submit({"task": "demo.echo", "payload": {"n": n}})["id"] for n in range(20)]
    wait_until(
        lambda: all(cluster.job(i)["state"] == "succeeded" for i in ids),
        timeout=60,
        interval=0.2,
        what="the jobs to succeed",
    )
    main, children = cluster.worker_pids()["default-1"]
    assert len(children) == 2
    assert [pid for pid in [main, *children] if maps_sqlalchemy(pid)] == []

    failing = cluster.submit({"task": "demo.fail", "payload": {"failures": 5}, "max_attempts": 2})[
        "id"
    ]
    dead = wait_until(
        lambda: (job := cluster.job(failing))["state"] == "dead" and job,
        timeout=60,
        interval=0.2,
        what="the failing job to die after its retry",
    )
    assert dead["attempts"] == 2
    assert dead["error"]["type"].endswith("InjectedFailure")
    main_now, children_now = cluster.worker_pids()["default-1"]
    assert (main_now, sorted(children_now)) == (main, sorted(children))
    # Loaded where the failures were recorded, and only there.
    assert not maps_sqlalchemy(main)
    assert any(maps_sqlalchemy(pid) for pid in children)
