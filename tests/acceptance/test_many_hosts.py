"""Three hosts on this machine as network namespaces (tests/netns.py): A holds PostgreSQL
and the broker, B the API, beat and a worker, C a second worker. In the middle of 1,000
jobs C's link is cut: its runs are rescued on B, nothing is lost, no job runs twice at
once, and when the link returns C's stale runs are fenced (none writes a success over the
rescued run). On Redis and on RabbitMQ. Where namespaces are not permitted the test
fails with one line saying so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, select

from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import job_events, jobs
from tests import workers
from tests.acceptance.cluster import FAST, Cluster, Receiver, report
from tests.netns import HOST_A, Hosts, NamespacesRefused, hosts
from tests.support import ROOT, wait_until

JOBS = 1000
CUT_AFTER = 300
CUT_SECONDS = 12.0
API_PORT = 8000

SUBMIT = """
import json, sys, httpx
url, key, hook, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# Every tenth job works alone for half a second (a run that can finish while its host is
# cut off); the others deliver a webhook through host A.
body = {"jobs": [
    {"task": "demo.sleep", "payload": {"seconds": 0.5}} if n % 10 == 0 else
    {"task": "webhook.deliver", "payload": {"url": hook, "body": {"n": n}}}
    for n in range(count)]}
answer = httpx.post(url + "/v1/jobs/batch", json=body, timeout=60,
                    headers={"Authorization": "Bearer " + key})
print(answer.status_code, len(answer.json().get("jobs", [])))
"""


def on_host_a(url: str) -> str:
    """A URL of this machine's loopback as the other hosts reach it, through host A."""
    return url.replace("127.0.0.1", HOST_A)


class Machines:
    """The hosts and the Conveyor processes on them."""

    def __init__(self, made: Hosts, database_url: str, broker_url: str, logs: Path) -> None:
        self.hosts = made
        self.logs = logs
        self.env = workers.service_env(
            on_host_a(database_url),
            on_host_a(broker_url),
            **FAST,
            CONVEYOR_WEBHOOK_ALLOWED_NETWORKS=f"{HOST_A}/32",
            CONVEYOR_API_HOST="127.0.0.1",
            CONVEYOR_API_PORT=str(API_PORT),
            CONVEYOR_API_RATE_PER_SECOND="0",
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, host: str, args: list[str], **env: str) -> None:
        handle = (self.logs / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            self.hosts.argv(host, [sys.executable, "-m", "conveyor", *args]),
            env={**self.env, **env},
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def pids(self, name: str) -> set[int]:
        """A process and its children (a prefork worker's pool)."""
        process = psutil.Process(self.processes[name].pid)
        return {process.pid, *(c.pid for c in process.children(recursive=True))}

    def run_on(self, host: str, argv: list[str], timeout: float = 120) -> str:
        done = subprocess.run(
            self.hosts.argv(host, argv),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop_all(self) -> None:
        for process in self.processes.values():
            workers.stop(process, timeout=15)


@pytest.fixture
def machines(
    pg_engine: Engine, pg_url: str, broker_url: str, tmp_path: Path
) -> Iterator[tuple[Machines, Receiver, Cluster]]:
    try:
        context = hosts()
        made = context.__enter__()
    except NamespacesRefused as refused:
        pytest.fail(str(refused), pytrace=False)
    receiver = Receiver(hold=0.02)
    receiver.__enter__()
    broker_port = 6379 if broker_url.startswith("redis") else 5672
    hook_port = int(receiver.url.split(":")[2].split("/")[0])
    relay = made.relay([5432, broker_port, hook_port], tmp_path / "relay.log")
    found = Machines(made, pg_url, broker_url, tmp_path)
    cluster = Cluster(pg_url, broker_url, pg_engine, tmp_path)
    try:
        yield found, receiver, cluster
    finally:
        found.stop_all()
        os.killpg(relay.pid, signal.SIGKILL)
        relay.wait()
        receiver.__exit__()
        context.__exit__(None, None, None)


def claims_by(engine: Engine, pids: set[int]) -> int:
    """Claims recorded by the processes of `pids` (a worker is named host:pid)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(job_events.c.worker).where(job_events.c.event == "claimed")
        ).all()
    return sum(1 for (worker,) in rows if worker and int(worker.rsplit(":", 1)[1]) in pids)


def test_a_worker_host_cut_off_mid_run_loses_nothing_and_its_stale_runs_are_fenced(
    machines: tuple[Machines, Receiver, Cluster], pg_engine: Engine, broker_url: str
) -> None:
    found, receiver, cluster = machines
    with make_session_factory(pg_engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme")
    found.start("api", "b", ["api"])
    found.start("beat", "b", ["beat"])
    found.start("worker-b", "b", ["worker", "--pool", "default", "--concurrency", "2"])
    # C logs at INFO: the results it could not record once its runs were taken away.
    found.start(
        "worker-c",
        "c",
        ["worker", "--pool", "default", "--concurrency", "2"],
        CONVEYOR_LOG_LEVEL="INFO",
    )
    api_up = [
        sys.executable,
        "-c",
        f"import httpx; httpx.get('http://127.0.0.1:{API_PORT}/healthz').raise_for_status()",
    ]
    wait_until(
        lambda: subprocess.run(found.hosts.argv("b", api_up), capture_output=True).returncode == 0,
        timeout=60,
        interval=0.5,
        what="the API on host B",
    )
    hook = on_host_a(receiver.url)
    answer = found.run_on(
        "b", [sys.executable, "-c", SUBMIT, f"http://127.0.0.1:{API_PORT}", key, hook, str(JOBS)]
    )
    assert answer.split() == ["202", str(JOBS)], answer

    def succeeded() -> int:
        return cluster.states().get("succeeded", 0)

    wait_until(lambda: succeeded() >= CUT_AFTER, timeout=120, what=f"{CUT_AFTER} jobs done")
    c_pids = found.pids("worker-c")
    b_pids = found.pids("worker-b")
    assert claims_by(pg_engine, c_pids) > 0, "host C ran nothing before its link was cut"
    # Cut while C runs a sleeping job: that run finishes during the partition.
    wait_until(
        lambda: _running_sleep_on(pg_engine, c_pids),
        timeout=60,
        interval=0.02,
        what="host C to run a demo.sleep job",
    )
    found.hosts.cut("c")
    cut_at = time.time()
    done_at_cut = succeeded()
    time.sleep(CUT_SECONDS)  # the partition itself: C's leases lapse, B's beat rescues them
    rescued_during_cut = sum(1 for e in _events(pg_engine) if e[1] == "rescued" and e[2] >= cut_at)
    done_during_cut = succeeded() - done_at_cut
    found.hosts.restore("c")
    states = cluster.wait_all_finished(JOBS, timeout=240)
    refused = "job result not recorded"
    wait_until(lambda: refused in found.log("worker-c"), timeout=60, what="C's stale result")
    stale_results_refused = found.log("worker-c").count(refused)
    events = _events(pg_engine)
    successes: dict[str, list[str | None]] = {}
    for job_id, event, _at, worker in events:
        if event == "succeeded":
            successes.setdefault(job_id, []).append(worker)
    lost = JOBS - states.get("succeeded", 0)
    twice = sum(1 for workers_of in successes.values() if len(workers_of) > 1)
    rescued = {job_id for job_id, event, _at, _w in events if event == "rescued"}
    # Fencing: a rescued job's one success belongs to a run claimed after its rescue (on
    # B, or on C once its link was back); the stale run, claimed before, wrote nothing.
    fenced_ok = all(_success_after_rescue(events, job_id) for job_id in rescued)
    figures = {
        "test": "many_hosts",
        "broker": broker_url.split(":")[0],
        "jobs": JOBS,
        "link_cuts": 1,
        "lost": lost,
        "overlapping_runs": cluster.overlapping_runs(),
        "overlapping_deliveries": receiver.overlapping(),
        "succeeded_twice": twice,
        "rescued": len(rescued),
        "rescued_during_cut": rescued_during_cut,
        "done_by_b_during_cut": done_during_cut,
        "claims_by_c": claims_by(pg_engine, c_pids),
        "stale_results_refused": stale_results_refused,
        "claims_by_b": claims_by(pg_engine, b_pids),
    }
    report(**figures)
    print(json.dumps(figures))
    assert lost == 0 and states == {"succeeded": JOBS}, figures
    assert figures["overlapping_runs"] == 0 and twice == 0, figures
    assert figures["overlapping_deliveries"] == 0, figures
    assert rescued_during_cut > 0 and done_during_cut > 0, figures
    assert fenced_ok, figures


def _success_after_rescue(events: list[tuple[str, str, float, str | None]], job_id: str) -> bool:
    """Whether the job's success followed a claim made after its last rescue."""
    mine = [event for j, event, _at, _w in events if j == job_id]
    if mine.count("succeeded") != 1 or "rescued" not in mine:
        return False
    last_rescue = len(mine) - 1 - mine[::-1].index("rescued")
    success = mine.index("succeeded")
    return success > last_rescue and "claimed" in mine[last_rescue:success]


def _running_sleep_on(engine: Engine, pids: set[int]) -> bool:
    """Whether one of `pids` runs a demo.sleep job now."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(jobs.c.worker).where(jobs.c.state == "running", jobs.c.task == "demo.sleep")
        ).all()
    return any(worker and int(worker.rsplit(":", 1)[1]) in pids for (worker,) in rows)


def _events(engine: Engine) -> list[tuple[str, str, float, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(job_events.c.job_id, job_events.c.event, job_events.c.at, job_events.c.worker)
            .join(jobs, jobs.c.id == job_events.c.job_id)
            .order_by(job_events.c.id)
        ).all()
    return [(str(j), e, at.timestamp(), w) for j, e, at, w in rows]
