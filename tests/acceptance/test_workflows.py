"""Workflows on real workers, both brokers: a chain, a fan-out with its fan-in, a diamond,
a failure cancelling its dependents and a retry resuming them, run_if "finished"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.acceptance.cluster import Cluster, Receiver, cluster_context
from tests.support import wait_until

TIMEOUT = 60.0


@pytest.fixture
def workers(pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from cluster_context(pg_url, broker_url, pg_engine, tmp_path, ["default-1"])


def submit(cluster: Cluster, steps: list[dict[str, Any]]) -> dict[str, Any]:
    assert cluster.client is not None
    answer = cluster.client.post("/v1/workflows", json={"steps": steps}, headers=cluster.headers())
    assert answer.status_code == 202, answer.text
    body: dict[str, Any] = answer.json()
    return body


def finished(cluster: Cluster, workflow_id: str) -> dict[str, Any]:
    """The workflow once every step has finished (one `?wait=` request at a time)."""
    assert cluster.client is not None

    def read() -> dict[str, Any] | None:
        answer = cluster.client.get(  # type: ignore[union-attr]
            f"/v1/workflows/{workflow_id}?wait=10", headers=cluster.headers()
        )
        body: dict[str, Any] = answer.json()
        return body if body["finished_at"] is not None else None

    return wait_until(read, timeout=TIMEOUT, interval=0.01, what=f"workflow {workflow_id}")


def by_key(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["key"]: step for step in workflow["steps"]}


def test_a_chain_a_fan_in_and_a_diamond_run_to_success(workers: Cluster) -> None:
    cluster = workers
    chain = submit(
        cluster,
        [
            {"key": "fetch", "task": "demo.echo", "payload": {"rows": 3}},
            {"key": "transform", "task": "demo.collect", "after": ["fetch"]},
            {"key": "load", "task": "demo.collect", "after": ["transform"]},
        ],
    )
    fan = [{"key": f"part-{i}", "task": "demo.echo", "payload": {"i": i}} for i in range(100)]
    fan.append({"key": "join", "task": "demo.collect", "after": [s["key"] for s in fan]})
    fan_in = submit(cluster, fan)
    diamond = submit(
        cluster,
        [
            {"key": "top", "task": "demo.echo", "payload": {"top": True}},
            {"key": "left", "task": "demo.collect", "after": ["top"]},
            {"key": "right", "task": "demo.collect", "after": ["top"]},
            {"key": "bottom", "task": "demo.collect", "after": ["left", "right"]},
        ],
    )
    done = finished(cluster, chain["id"])
    assert done["state"] == "succeeded"
    load = cluster.job(by_key(done)["load"]["job_id"])
    assert load["result"] == {
        "payload": {},
        "parents": {"transform": {"payload": {}, "parents": {"fetch": {"rows": 3}}}},
    }
    done = finished(cluster, fan_in["id"])
    assert done["state"] == "succeeded"
    join = cluster.job(by_key(done)["join"]["job_id"])
    assert join["result"]["parents"] == {f"part-{i}": {"i": i} for i in range(100)}
    assert join["attempts"] == 1
    done = finished(cluster, diamond["id"])
    assert done["state"] == "succeeded"
    bottom = cluster.job(by_key(done)["bottom"]["job_id"])
    assert set(bottom["result"]["parents"]) == {"left", "right"}
    # The fan-in ran once, after its last parent.
    events = [e for e, _, _ in cluster.events_of(by_key(done)["bottom"]["job_id"])]
    assert events.count("claimed") == 1 and events.count("released") == 1


def test_a_dead_step_cancels_its_dependents_and_its_retry_resumes_them(
    workers: Cluster,
) -> None:
    cluster = workers
    assert cluster.client is not None
    # The receiver refuses the first delivery (400: dead at once), then takes the next.
    with Receiver(hold=0.0, answers=[400]) as receiver:
        _dead_step_and_resume(cluster, receiver)


def _dead_step_and_resume(cluster: Cluster, receiver: Receiver) -> None:
    assert cluster.client is not None
    flow = submit(
        cluster,
        [
            {
                "key": "flaky",
                "task": "webhook.deliver",
                "payload": {"url": receiver.url, "body": {"n": 1}},
            },
            {"key": "next", "task": "demo.collect", "after": ["flaky"]},
            {"key": "last", "task": "demo.collect", "after": ["next"]},
            {"key": "cleanup", "task": "demo.collect", "after": ["flaky"], "run_if": "finished"},
        ],
    )
    done = finished(cluster, flow["id"])
    assert done["state"] == "failed"
    steps = by_key(done)
    assert {k: s["state"] for k, s in steps.items()} == {
        "flaky": "dead",
        "next": "cancelled",
        "last": "cancelled",
        "cleanup": "succeeded",
    }
    assert cluster.job(steps["last"]["job_id"])["error"]["type"] == "upstream_failed"
    # Retried, it is delivered: the workflow resumes where it broke.
    retried = cluster.client.post(
        f"/v1/jobs/{steps['flaky']['job_id']}/retry", headers=cluster.headers()
    )
    assert retried.status_code == 200, retried.text
    resumed = cluster.client.get(f"/v1/workflows/{flow['id']}", headers=cluster.headers()).json()
    assert resumed["state"] == "running"
    done = finished(cluster, flow["id"])
    assert done["state"] == "succeeded", done
    steps = by_key(done)
    assert {s["state"] for s in steps.values()} == {"succeeded"}
    flaky = cluster.job(steps["flaky"]["job_id"])["result"]
    assert cluster.job(steps["last"]["job_id"])["result"]["parents"] == {
        "next": {"payload": {}, "parents": {"flaky": flaky}}
    }
    assert len(receiver.deliveries) == 2
    # The step that ran whatever happened ran once, not again on the resume.
    assert [e for e, _, _ in cluster.events_of(steps["cleanup"]["job_id"])].count("claimed") == 1


def test_cancelling_a_running_workflow_stops_its_steps(workers: Cluster) -> None:
    cluster = workers
    assert cluster.client is not None
    flow = submit(
        cluster,
        [
            {"key": "slow", "task": "demo.sleep", "payload": {"seconds": 60}},
            {"key": "after", "task": "demo.echo", "after": ["slow"]},
        ],
    )
    slow = by_key(flow)["slow"]["job_id"]
    wait_until(lambda: cluster.job(slow)["state"] == "running", timeout=TIMEOUT, what="running")
    answer = cluster.client.post(f"/v1/workflows/{flow['id']}/cancel", headers=cluster.headers())
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "cancelled"
    done = finished(cluster, flow["id"])
    assert done["state"] == "cancelled"
    assert {s["state"] for s in done["steps"]} == {"cancelled"}
    # The sleeping run was told to stop and did, well before its 60 seconds.
    wait_until(
        lambda: "stopped" in [e for e, _, _ in cluster.events_of(slow)],
        timeout=20,
        what="the run to stop",
    )
