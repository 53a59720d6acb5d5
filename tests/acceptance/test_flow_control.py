"""Flow control with real workers: global rate limits and per-key concurrency across workers."""

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


@pytest.fixture(params=sorted(BROKERS))
def rate_cluster(
    request: pytest.FixtureRequest, pg_engine: Engine, pg_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    # Redis as broker: slots in Redis. RabbitMQ as broker: slots in the job store.
    yield from limited_cluster(
        request,
        pg_engine,
        pg_url,
        BROKERS[request.param],
        tmp_path,
        {"demo.echo": {"rate": RATE}},
    )


RATE = 20
WINDOW = 30.0


def test_a_global_rate_limit_holds_across_two_workers(rate_cluster: Cluster) -> None:
    assert rate_cluster.client is not None
    # More than the window can start, so the limit binds from the first start to the last.
    total = int(RATE * WINDOW * 1.2)
    body = {"jobs": [{"task": "demo.echo", "payload": {"n": n}} for n in range(total)]}
    response = rate_cluster.client.post("/v1/jobs/batch", json=body, headers=rate_cluster.headers())
    assert response.status_code == 202
    states = rate_cluster.wait_all_finished(total, timeout=WINDOW * 1.2 + 60)
    assert states == {"succeeded": total}
    with rate_cluster.engine.connect() as conn:
        starts = sorted(t for (t,) in conn.execute(select(jobs.c.started_at)).all())
    first = starts[0]
    window = [(t - first).total_seconds() for t in starts]
    in_window = sum(1 for t in window if t < WINDOW)
    rate = in_window / WINDOW
    per_5s = [sum(1 for t in window if k <= t < k + 5) / 5 for k in range(0, int(WINDOW), 5)]
    print(
        f"\n{total} jobs, limit {RATE}/s: {in_window} starts in the first {WINDOW:.0f} s "
        f"= {rate:.2f}/s; per 5 s: {per_5s}; all {total} succeeded"
    )
    assert abs(rate - RATE) <= RATE * 0.1
    # Not only on average: no 5-second stretch runs over the limit by more than 10%.
    assert max(per_5s) <= RATE * 1.1


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
