"""Workflows on real workers, both brokers: a chain, a fan-out with its fan-in, a diamond,
a failure cancelling its dependents and a retry resuming them, run_if "finished"."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.acceptance.cluster import Cluster, Receiver, cluster_context, kill_until, report
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


@pytest.fixture
def killed_workers(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[Cluster]:
    yield from cluster_context(pg_url, broker_url, pg_engine, tmp_path, ["default-1", "default-2"])


def test_worker_kills_during_a_500_step_workflow_run_every_step_once(
    killed_workers: Cluster,
) -> None:
    cluster = killed_workers
    rng = random.Random(11)
    with Receiver() as receiver:
        parts: list[dict[str, Any]] = []
        for n in range(497):
            if n % 4 == 0:
                task = {
                    "task": "webhook.deliver",
                    "payload": {"url": receiver.url, "body": {"n": n}},
                }
            else:
                task = {"task": "demo.sleep", "payload": {"seconds": rng.uniform(0.02, 0.2)}}
            parts.append({"key": f"part-{n}", "after": ["root"], **task})
        flow = submit(
            cluster,
            [
                {"key": "root", "task": "demo.echo", "payload": {"go": True}},
                *parts,
                {"key": "join", "task": "demo.collect", "after": [p["key"] for p in parts]},
                {"key": "final", "task": "demo.collect", "after": ["join"]},
            ],
        )
        assert cluster.client is not None
        client = cluster.client

        def workflow_finished() -> bool:
            now = client.get(f"/v1/workflows/{flow['id']}", headers=cluster.headers())
            return bool(now.json()["finished_at"] is not None)

        kills = kill_until(cluster, rng, workflow_finished, at_least=8, at_most=16)
        done = finished(cluster, flow["id"])
        assert kills >= 8
        assert done["state"] == "succeeded", {s["key"]: s["state"] for s in done["steps"]}
        assert {s["state"] for s in done["steps"]} == {"succeeded"}
        # Every step succeeded once, no two runs of one step overlapped, every webhook
        # was delivered, never twice at once; the fan-in was released and ran once.
        for one in done["steps"]:
            events = [e for e, _, _ in cluster.events_of(one["job_id"])]
            assert events.count("succeeded") == 1, (one["key"], events)
        assert cluster.overlapping_runs() == 0
        hooks = {s["job_id"] for s in done["steps"] if s["key"].startswith("part-")}
        delivered = {d.key for d in receiver.deliveries}
        assert delivered <= hooks and len(delivered) == len(parts[::4])
        assert receiver.overlaps() == []
        join = by_key(done)["join"]
        join_events = [e for e, _, _ in cluster.events_of(join["job_id"])]
        assert join_events.count("released") == 1
        final = cluster.job(by_key(done)["final"]["job_id"])
        assert set(final["result"]["parents"]["join"]["parents"]) == {p["key"] for p in parts}
        report(
            test="kills during a 500-step workflow",
            broker=cluster.broker_url.split(":")[0],
            steps=len(done["steps"]),
            kills=kills,
            restarts=cluster.restarts,
            join_claims=join_events.count("claimed"),
            deliveries=len(receiver.deliveries),
        )
