"""A frozen broker (SIGSTOP; a partition looks the same) delays jobs but never the API.

Each test runs on Redis and on RabbitMQ, with real worker and beat processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, func, select

from conveyor.jobs.tables import jobs
from tests.acceptance.cluster import Cluster, cluster_context, report
from tests.support import wait_until

PORTS = {"redis": 6379, "rabbitmq": 5672}

FREEZE_SECONDS = 20.0
SUBMIT_SECONDS = 30.0
SUBMIT_EVERY = 0.075
SUBMIT_LIMIT = 2.0
READYZ_LIMIT = 2.0


@pytest.fixture
def cluster(pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path) -> Iterator[Cluster]:
    yield from cluster_context(pg_url, broker_url, pg_engine, tmp_path, ["high-1", "default-1"])


def broker_pids(broker_url: str) -> list[int]:
    """The processes listening on the broker's port: redis-server, or RabbitMQ's beam.smp."""
    port = PORTS["redis" if broker_url.startswith("redis") else "rabbitmq"]
    pids = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    }
    assert pids, f"nothing listens on port {port}"
    names = {psutil.Process(pid).name() for pid in pids}
    assert names <= {"redis-server", "beam.smp"}, f"port {port} belongs to {names}"
    return sorted(pids)


class Freeze:
    """On its own thread: SIGSTOP the broker `after` seconds from entry, SIGCONT `seconds` later.

    The outage runs on a clock of its own, so a submission that hangs cannot stretch it;
    leaving the block always wakes the broker.
    """

    def __init__(self, pids: list[int], *, after: float, seconds: float) -> None:
        self.pids = pids
        self.after = after
        self.seconds = seconds
        self.frozen_at: float | None = None
        self.thawed_at: float | None = None
        self.thawed_wall = 0.0
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._guard: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Freeze:
        # Should this process die outright (SIGKILL, a hard timeout), a detached shell
        # still wakes the broker: the shared Redis and RabbitMQ serve other tests too.
        pids = " ".join(map(str, self.pids))
        self._guard = subprocess.Popen(
            ["sh", "-c", f"sleep {self.after + self.seconds + 15:.0f}; kill -CONT {pids}"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        if self._cancel.wait(self.after):
            return
        with self._lock:
            if self._cancel.is_set():
                return
            for pid in self.pids:
                os.kill(pid, signal.SIGSTOP)
            self.frozen_at = time.monotonic()
        self._cancel.wait(self.seconds)
        self.thaw()

    def thaw(self) -> None:
        with self._lock:
            if self.frozen_at is None or self.thawed_at is not None:
                return
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.thawed_at = time.monotonic()
            self.thawed_wall = time.time()

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None and self.thawed_at is None

    def __exit__(self, *_args: object) -> None:
        self._cancel.set()
        self.thaw()
        self._thread.join(timeout=10)
        self.thaw()
        if self._guard is not None:
            self._guard.kill()
            self._guard.wait()


def test_submissions_answer_while_the_broker_is_frozen(cluster: Cluster) -> None:
    client = cluster.client
    assert client is not None
    # Warm up: workers consume and every connection to the broker is open before it stops.
    first = cluster.submit({"task": "demo.echo", "payload": {"n": -1}})
    wait_until(
        lambda: cluster.job(first["id"])["state"] == "succeeded",
        timeout=60,
        interval=0.2,
        what="the warm-up job to run",
    )
    assert client.get("/readyz").status_code == 200

    latencies: list[float] = []
    frozen_latencies: list[float] = []
    deferred = 0
    readyz: list[tuple[int, float, str]] = []
    ids = [first["id"]]
    frozen_ids: list[uuid.UUID] = []
    with Freeze(broker_pids(cluster.broker_url), after=3.0, seconds=FREEZE_SECONDS) as freeze:
        done = threading.Event()

        def probe_readiness() -> None:
            # Every 2 s once the broker has been stopped for a second, beside the stream.
            while not done.wait(0.1):
                frozen_at = freeze.frozen_at
                if not freeze.frozen or frozen_at is None or time.monotonic() - frozen_at < 1:
                    continue
                began = time.monotonic()
                probe = client.get("/readyz")
                if freeze.frozen:
                    readyz.append((probe.status_code, time.monotonic() - began, probe.text))
                done.wait(max(0.0, 2.0 - (time.monotonic() - began)))

        prober = threading.Thread(target=probe_readiness, daemon=True)
        prober.start()
        try:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < SUBMIT_SECONDS:
                began = time.monotonic()
                during = freeze.frozen
                response = client.post(
                    "/v1/jobs",
                    json={"task": "demo.echo", "payload": {"n": n}},
                    headers=cluster.headers(),
                )
                took = time.monotonic() - began
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
                latencies.append(took)
                if during:
                    frozen_latencies.append(took)
                    frozen_ids.append(uuid.UUID(ids[-1]))
                deferred += response.headers.get("Conveyor-Publish") == "deferred"
                n += 1
                time.sleep(max(0.0, SUBMIT_EVERY - took))
        finally:
            done.set()
            prober.join(timeout=30)
    assert freeze.thawed_at is not None
    thawed_at = freeze.thawed_at

    slowest = max(latencies)
    assert slowest < SUBMIT_LIMIT, f"the slowest submission took {slowest:.2f} s"
    assert frozen_latencies, "no submission began while the broker was frozen"
    assert deferred > 0
    assert len(readyz) >= 3, readyz
    for status, took, text in readyz:
        assert status == 503, text
        assert "broker" in json.loads(text)["detail"], text
        assert took < READYZ_LIMIT, f"/readyz took {took:.2f} s"
    wait_until(
        lambda: client.get("/readyz").status_code == 200,
        timeout=30,
        interval=0.5,
        what="/readyz to see the broker again",
    )

    states = cluster.wait_all_finished(len(ids), timeout=180)
    drained = time.monotonic() - thawed_at
    assert states == {"succeeded": len(ids)}
    # When the last job accepted while the broker was frozen finished (the store's clock
    # is this machine's).
    with cluster.engine.connect() as conn:
        last = conn.execute(
            select(func.max(jobs.c.finished_at)).where(jobs.c.id.in_(frozen_ids))
        ).scalar_one()
    frozen_drained = last.timestamp() - freeze.thawed_wall
    assert cluster.overlapping_runs() == 0
    report(
        test="frozen-broker",
        broker=cluster.broker_url.split(":")[0],
        jobs=len(ids),
        frozen_seconds=FREEZE_SECONDS,
        submitted_while_frozen=len(frozen_latencies),
        deferred=deferred,
        max_submit_seconds=round(slowest, 3),
        max_submit_seconds_frozen=round(max(frozen_latencies), 3),
        max_readyz_seconds=round(max(took for _, took, _ in readyz), 3),
        frozen_jobs_done_seconds_after_thaw=round(frozen_drained, 1),
        all_done_seconds_after_thaw=round(drained, 1),
        lost=len(ids) - states.get("succeeded", 0),
    )
