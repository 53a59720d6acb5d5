"""A real Conveyor cluster for acceptance tests: worker and beat processes on real services."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from conveyor.api.app import create_app
from conveyor.cli.wiring import Platform, build_platform
from conveyor.config import Settings
from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import job_events, jobs
from tests import workers
from tests.support import wait_until

BROKERS = {
    "redis": "redis://127.0.0.1:6379/7",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
# Where the reliability figures of a run are appended, one JSON line per test.
REPORT = Path(os.environ.get("CONVEYOR_RELIABILITY_REPORT", "/tmp/conveyor-reliability.jsonl"))


def report(**figures: Any) -> None:
    """Append one test's figures to the report."""
    with REPORT.open("a") as handle:
        handle.write(json.dumps(figures) + "\n")


# Short leases so a killed worker's jobs come back within seconds, not a minute.
FAST = {
    "CONVEYOR_LEASE_SECONDS": "4",
    "CONVEYOR_HEARTBEAT_SECONDS": "0.5",
    "CONVEYOR_RESCUE_INTERVAL_SECONDS": "1",
    "CONVEYOR_RELAY_GRACE_SECONDS": "3",
    "CONVEYOR_SHUTDOWN_GRACE_SECONDS": "10",
    "CONVEYOR_PREFETCH_MULTIPLIER": "1",
}


@dataclass
class Cluster:
    """Workers, beat and an in-process API over one database and broker."""

    database_url: str
    broker_url: str
    engine: Engine
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    platform: Platform | None = None
    client: TestClient | None = None
    key: str = ""
    restarts: int = 0
    # Extra environment per process name (a skewed clock, a pool class).
    env_of: dict[str, dict[str, str]] = field(default_factory=dict)
    # Extra environment of every process (a database pooler).
    env_all: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return workers.service_env(self.database_url, self.broker_url, **FAST, **self.env_all)

    def start(self, name: str, args: list[str]) -> None:
        env = {**self.env, **self.env_of.get(name, {})}
        self.processes[name] = workers.start(args, env, self.logs / f"{name}.log")

    def start_all(self, worker_names: list[str]) -> None:
        for name in worker_names:
            pool = name.split("-")[0]
            self.start(name, ["worker", "--pool", pool, "--concurrency", "2"])
        self.start("beat", ["beat"])

    def restart(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            workers.stop(process)
        args = process.args[3:] if isinstance(process.args, list) else []
        self.start(name, [str(a) for a in args])
        self.restarts += 1

    def stop_all(self) -> None:
        for process in self.processes.values():
            workers.stop(process, timeout=15)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        response = self.client.post("/v1/jobs", json=body, headers=self.headers())
        assert response.status_code == 202, response.text
        job: dict[str, Any] = response.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        assert self.client is not None
        body: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers()).json()
        return body

    def states(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {state: count for state, count in rows}

    def wait_all_finished(self, total: int, timeout: float) -> dict[str, int]:
        def finished() -> dict[str, int] | None:
            states = self.states()
            done = sum(states.get(s, 0) for s in ("succeeded", "dead", "cancelled"))
            return states if done == total else None

        return wait_until(finished, timeout=timeout, interval=0.5, what=f"{total} jobs to finish")

    def events_of(self, job_id: str) -> list[tuple[str, str | None, float]]:
        """A job's events as (event, worker, time): what a failed check prints."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(job_events.c.event, job_events.c.worker, job_events.c.at)
                .where(job_events.c.job_id == job_id)
                .order_by(job_events.c.id)
            ).all()
        return [(event, worker, at.timestamp()) for event, worker, at in rows]

    def overlapping_runs(self) -> int:
        """Claims made while an earlier attempt of the same job was still open, per the store."""
        closing = {"succeeded", "failed", "dead", "rescued", "released", "cancelled"}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(job_events.c.job_id, job_events.c.event).order_by(
                    job_events.c.job_id, job_events.c.id
                )
            ).all()
        overlaps = 0
        open_runs: dict[Any, bool] = {}
        for job_id, event in rows:
            if event == "claimed":
                if open_runs.get(job_id):
                    overlaps += 1
                open_runs[job_id] = True
            elif event in closing:
                open_runs[job_id] = False
        return overlaps

    def worker_pids(self) -> dict[str, tuple[int, list[int]]]:
        """Each worker's main pid and its pool children's pids."""
        found = {}
        for name, process in self.processes.items():
            if not name.startswith(("high", "default", "low")) or process.poll() is not None:
                continue
            try:
                children = [c.pid for c in psutil.Process(process.pid).children()]
            except psutil.NoSuchProcess:
                continue
            found[name] = (process.pid, children)
        return found


def cluster_context(
    database_url: str,
    broker_url: str,
    engine: Engine,
    logs: Path,
    worker_names: list[str],
    env_of: dict[str, dict[str, str]] | None = None,
    pooler: str = "none",
) -> Iterator[Cluster]:
    env_all = {"CONVEYOR_DATABASE_POOLER": pooler} if pooler != "none" else {}
    cluster = Cluster(database_url, broker_url, engine, logs, env_of=env_of or {}, env_all=env_all)
    with make_session_factory(engine).begin() as session:
        cluster.key, _ = keys.create_key(session, tenant="acme")
    cluster.platform = build_platform(
        Settings(
            database_url=database_url,
            broker_url=broker_url,
            api_rate_per_second=0,
            database_pooler=pooler,  # type: ignore[arg-type]
        )
    )
    cluster.start_all(worker_names)
    try:
        with TestClient(create_app(cluster.platform.api_state())) as client:
            cluster.client = client
            yield cluster
    finally:
        cluster.stop_all()
        cluster.platform.store.dispose()


def kill_until(
    cluster: Cluster,
    rng: random.Random,
    done: Callable[[], bool],
    *,
    at_least: int,
    at_most: int,
    seconds: float = 240.0,
) -> int:
    """SIGKILL a worker every second (a pool child, or the main process and its group,
    then started again), at most `at_most` times, until `done()` after `at_least` kills;
    the number of kills."""
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if kills >= at_least and done():
            break
        running = cluster.worker_pids()
        name = rng.choice(sorted(running)) if running else None
        if name is not None and kills < at_most:
            main, children = running[name]
            if children and kills % 2 == 0:
                kill(rng.choice(children))
            else:
                kill(main, group=True)
                cluster.restart(name)
            kills += 1
        time.sleep(1.0)
    return kills


def kill(pid: int, group: bool = False) -> None:
    """SIGKILL a process (or its whole group), ignoring one that is already gone."""
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Delivery:
    key: str
    started: float
    ended: float


class Receiver:
    """A local webhook receiver recording each delivery's Idempotency-Key and timing."""

    def __init__(self, hold: float = 0.05, answers: list[int] | None = None) -> None:
        # The statuses of the first requests, in order; 200 for every one after them.
        self.answers = list(answers or [])
        self.deliveries: list[Delivery] = []
        self.bodies: dict[str, Any] = {}
        self.started = 0  # requests that have begun, finished or not
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                started = time.monotonic()
                with receiver._lock:
                    receiver.started += 1
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                time.sleep(hold)
                key = self.headers.get("Idempotency-Key", "")
                with receiver._lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                finally:  # a sender that was stopped and hung up still had this delivery
                    with receiver._lock:
                        receiver.deliveries.append(Delivery(key, started, time.monotonic()))
                        receiver.bodies[key] = body

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_args: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def overlapping(self) -> int:
        """Deliveries of one key that overlapped in time."""
        return len(self.overlaps())

    def overlaps(self) -> list[tuple[Delivery, Delivery]]:
        """Each pair of deliveries of one key where the later began before the earlier ended."""
        by_key: dict[str, list[Delivery]] = {}
        for delivery in self.deliveries:
            by_key.setdefault(delivery.key, []).append(delivery)
        found = []
        for runs in by_key.values():
            runs.sort(key=lambda d: d.started)
            for earlier, later in itertools.pairwise(runs):
                if later.started < earlier.ended:
                    found.append((earlier, later))
        return found
