"""Progress while a job runs, and `?wait=` until it ends: a real worker, both brokers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.acceptance.cluster import Cluster, cluster_context
from tests.support import wait_until


@pytest.fixture
def one_worker(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    yield from cluster_context(pg_url, broker_url, pg_engine, tmp_path, ["default-1"])


def test_a_sleeping_job_reports_progress_and_a_waiting_read_sees_it_end(
    one_worker: Cluster,
) -> None:
    cluster = one_worker
    job = cluster.submit({"task": "demo.sleep", "payload": {"seconds": 3}})
    seen: list[float] = []

    def reported_twice() -> bool:
        progress = cluster.job(job["id"])["progress"]
        if progress is not None:
            assert progress["of"] == 3
            if not seen or progress["slept"] > seen[-1]:
                seen.append(progress["slept"])
        return len(seen) >= 2

    wait_until(reported_twice, timeout=30, interval=0.1, what="two progress reports")
    assert 0 <= seen[0] < seen[1] < 3
    assert cluster.client is not None
    # One request that waits for the end instead of polling it.
    answer = cluster.client.get(f"/v1/jobs/{job['id']}?wait=30", headers=cluster.headers())
    assert answer.status_code == 200
    done = answer.json()
    assert done["state"] == "succeeded"
    assert done["result"]["slept"] >= 3
