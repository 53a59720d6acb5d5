"""Never two runs of one job at once, whatever the clocks say: real processes, both brokers.

A job cancelled while it runs and retried at once, fifty times, on the prefork and on
the threads pool; workers and a beat whose clocks run 30 s ahead or behind.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from conveyor.jobs.tables import job_events, jobs
from tests.acceptance.cluster import Cluster, Receiver, cluster_context, kill, report
from tests.support import wait_until

# Moves a process's wall clock and leaves its monotonic clock alone. (libfaketime cannot:
# Python's sleeps wait on absolute monotonic deadlines, which it breaks or hangs.)
SKEW_HOOK = Path(__file__).parent / "skewed_clock"
# The outcome of a run: where it ended, as the worker running it recorded it.
RUN_ENDS = {"succeeded", "failed", "dead", "stopped", "rescued", "released"}


def _runs(engine: Engine, job_id: str) -> list[tuple[float, float | None]]:
    """Each run of a job as (claimed at, ended at) by the store's events, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(job_events.c.event, job_events.c.at)
            .where(job_events.c.job_id == job_id)
            .order_by(job_events.c.id)
        ).all()
    runs: list[tuple[float, float | None]] = []
    start: float | None = None
    for event, at in rows:
        if event == "claimed":
            if start is not None:
                runs.append((start, None))  # claimed again before this run ended
            start = at.timestamp()
        elif event in RUN_ENDS and start is not None:
            runs.append((start, at.timestamp()))
            start = None
    if start is not None:
        runs.append((start, None))
    return runs


def _overlapping(runs: list[tuple[float, float | None]]) -> int:
    return sum(
        1 for (_, ended), (began, _) in itertools.pairwise(runs) if ended is None or began < ended
    )


@pytest.fixture(params=["prefork", "threads"])
def one_worker(
    request: pytest.FixtureRequest, pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    pool = {"CONVEYOR_WORKER_POOL_CLASS": request.param}
    yield from cluster_context(
        pg_url, broker_url, pg_engine, tmp_path, ["default-1"], env_of={"default-1": pool}
    )


def test_cancel_then_retry_at_once_never_runs_twice(one_worker: Cluster) -> None:
    cluster = one_worker
    assert cluster.client is not None
    rounds = 50
    # Each delivery holds the receiver 0.4 s: a cancelled run is stuck in its HTTP call
    # (a thread cannot be interrupted there) while its retry is asked for.
    with Receiver(hold=0.4) as receiver:
        job = cluster.submit(
            {"task": "webhook.deliver", "payload": {"url": receiver.url, "body": {}}}
        )
        waits = []
        for n in range(rounds):
            wait_until(
                lambda n=n: receiver.started > n, timeout=30, interval=0.005, what=f"run {n + 1}"
            )
            cancel = cluster.client.post(f"/v1/jobs/{job['id']}/cancel", headers=cluster.headers())
            assert cancel.status_code == 200, cancel.text
            asked = time.monotonic()
            retry = cluster.client.post(f"/v1/jobs/{job['id']}/retry", headers=cluster.headers())
            assert retry.status_code == 200, retry.text
            wait_until(
                lambda n=n: receiver.started > n + 1,
                timeout=30,
                interval=0.005,
                what=f"the retry after cancel {n + 1} to start",
            )
            waits.append(time.monotonic() - asked)
        done = wait_until(
            lambda: (j := cluster.job(job["id"]))["state"] == "succeeded" and j,
            timeout=60,
            interval=0.1,
            what="the last retry to succeed",
        )
    runs = _runs(cluster.engine, job["id"])
    if len(runs) != rounds + 1:
        Path("/tmp/guarantee-debug.txt").write_text(
            "\n".join(map(str, receiver.deliveries + cluster.events_of(job["id"])))
        )
    assert len(runs) == rounds + 1
    assert _overlapping(runs) == 0, runs
    assert receiver.overlaps() == []
    assert done["attempts"] == 1
    report(
        test="cancel-then-retry",
        broker=cluster.broker_url.split(":")[0],
        pool=cluster.env_of["default-1"]["CONVEYOR_WORKER_POOL_CLASS"],
        rounds=rounds,
        runs=len(runs),
        overlapping_store=_overlapping(runs),
        overlapping_receiver=receiver.overlapping(),
        retry_start_p50_seconds=round(sorted(waits)[len(waits) // 2], 3),
        retry_start_max_seconds=round(max(waits), 3),
    )


def _skewed(seconds: int) -> dict[str, str]:
    """A process whose wall clock (`time.time`, `datetime.now`) runs `seconds` off."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SKEW_HOOK), os.environ.get("PYTHONPATH")])),
        "CONVEYOR_TEST_CLOCK_SKEW": str(seconds),
    }


@pytest.fixture
def skewed_cluster(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    env_of = {"default-1": _skewed(30), "default-2": _skewed(-30), "beat": _skewed(30)}
    yield from cluster_context(
        pg_url, broker_url, pg_engine, tmp_path, ["default-1", "default-2"], env_of=env_of
    )


def test_skewed_clocks_neither_rescue_live_jobs_nor_keep_dead_leases(
    skewed_cluster: Cluster,
) -> None:
    cluster = skewed_cluster
    # Runs of 6 s outlive the 4 s lease: only renewals keep them, and the beat, 30 s
    # ahead, runs rescue all along.
    ids = [
        cluster.submit({"task": "demo.sleep", "payload": {"seconds": 6}})["id"] for _ in range(8)
    ]
    wait_until(
        lambda: cluster.states().get("succeeded", 0) >= 4,
        timeout=90,
        interval=0.2,
        what="the first jobs to finish",
    )
    assert _events(cluster, "rescued") == 0, "a live job was rescued"
    # Now the worker whose clock runs behind dies mid-run: its jobs must come back as
    # soon as their leases end by the database's clock, not 30 s later.
    wait_until(
        lambda: _running_on(cluster, "default-2"),
        timeout=60,
        interval=0.1,
        what="a run on default-2",
    )
    behind = cluster.worker_pids()["default-2"][0]
    killed_at = time.monotonic()
    kill(behind, group=True)
    wait_until(
        lambda: _events(cluster, "rescued") > 0,
        timeout=20,
        interval=0.1,
        what="the dead worker's jobs to be rescued",
    )
    rescued_after = time.monotonic() - killed_at
    states = cluster.wait_all_finished(len(ids), timeout=120)
    assert states == {"succeeded": len(ids)}
    # Lease 4 s, rescue every second: back within the lease and a little, by any clock.
    assert rescued_after < 9, rescued_after
    overlaps = sum(_overlapping(_runs(cluster.engine, job_id)) for job_id in ids)
    assert overlaps == 0
    report(
        test="skewed-clocks",
        broker=cluster.broker_url.split(":")[0],
        jobs=len(ids),
        skews_seconds={"default-1": 30, "default-2": -30, "beat": 30},
        rescued_live=0,
        rescued_after_kill_seconds=round(rescued_after, 2),
        overlapping_store=overlaps,
    )


def _events(cluster: Cluster, name: str) -> int:
    with cluster.engine.connect() as conn:
        return len(conn.execute(select(job_events.c.id).where(job_events.c.event == name)).all())


def _running_on(cluster: Cluster, name: str) -> bool:
    """Whether a process of worker `name` (its main process or a pool child) runs a job."""
    main, children = cluster.worker_pids()[name]
    pids = {str(main), *(str(c) for c in children)}
    with cluster.engine.connect() as conn:
        found = conn.execute(select(jobs.c.worker).where(jobs.c.state == "running")).scalars()
        return any(w is not None and w.rsplit(":", 1)[-1] in pids for w in found)
