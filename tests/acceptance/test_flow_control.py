"""Flow control with real workers: a per-key concurrency limit holds across workers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from conveyor.jobs.tables import jobs
from tests.acceptance import cluster as cluster_module
from tests.acceptance import services
from tests.acceptance.cluster import Cluster, cluster_context

BROKERS = {
    "redis": "redis://127.0.0.1:6379/7",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}


def limited_cluster(
    request: pytest.FixtureRequest,
    engine: Engine,
    url: str,
    broker: str,
    logs: Path,
    limits: dict[str, object],
) -> Iterator[Cluster]:
    if broker.startswith("redis"):
        request.getfixturevalue("redis_url")
    else:
        request.getfixturevalue("amqp_url")
        services.reset_rabbitmq_queues(broker)
    saved = dict(cluster_module.FAST)
    cluster_module.FAST["CONVEYOR_LIMITS"] = json.dumps(limits)
    try:
        yield from cluster_context(url, broker, engine, logs, ["high-1", "default-1", "default-2"])
    finally:
        cluster_module.FAST.clear()
        cluster_module.FAST.update(saved)


@pytest.fixture
def concurrency_cluster(
    request: pytest.FixtureRequest, pg_engine: Engine, pg_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    yield from limited_cluster(
        request,
        pg_engine,
        pg_url,
        BROKERS["redis"],
        tmp_path,
        {"demo.sleep": {"key": "tag:customer:", "concurrency": 1}},
    )


def test_a_per_key_concurrency_limit_never_overlaps(concurrency_cluster: Cluster) -> None:
    assert concurrency_cluster.client is not None
    body = {
        "jobs": [
            {"task": "demo.sleep", "payload": {"seconds": 0.1}, "tags": [f"customer:{n % 10}"]}
            for n in range(200)
        ]
    }
    response = concurrency_cluster.client.post(
        "/v1/jobs/batch", json=body, headers=concurrency_cluster.headers()
    )
    assert response.status_code == 202
    states = concurrency_cluster.wait_all_finished(200, timeout=180)
    assert states == {"succeeded": 200}
    with concurrency_cluster.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.tags, jobs.c.started_at, jobs.c.finished_at)).all()
    by_key: dict[str, list[tuple[object, object]]] = {}
    for tags, started, finished in rows:
        by_key.setdefault(tags[0], []).append((started, finished))
    overlaps = 0
    for runs in by_key.values():
        runs.sort()
        for (_, end), (begin, _) in itertools.pairwise(runs):
            if begin < end:
                overlaps += 1
    print(f"\n200 jobs over {len(by_key)} keys, overlapping runs of a key: {overlaps}")
    assert len(by_key) == 10
    assert overlaps == 0
