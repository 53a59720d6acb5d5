"""`conveyor up` with real URLs: separate processes that run jobs and all stop on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import ROOT, conveyor_command, free_port, wait_until
from tests.workers import service_env


@pytest.mark.usefixtures("pg_engine")
def test_up_supervises_api_workers_and_beat(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    metrics = free_ports_in_a_row(4)
    env = service_env(
        pg_url, redis_url, CONVEYOR_API_PORT=str(port), CONVEYOR_METRICS_PORT=str(metrics)
    )
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen(
        conveyor_command("up"), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        text = wait_until(
            lambda: "Supervising:" in (t := Path(log.name).read_text()) and t,
            timeout=60,
            what="the supervisor to start its children",
        )
        names = ("worker-high", "worker-default", "worker-low", "beat")
        listed = ", ".join(f"{n} (metrics :{metrics + i})" for i, n in enumerate(names))
        assert f"api, {listed}" in text
        key = next(line.rsplit(" ", 1)[1] for line in text.splitlines() if "Admin API key" in line)
        children = psutil.Process(process.pid).children()
        assert len(children) == 5
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: _ok(f"{base}/readyz"), timeout=60, interval=0.2, what="the API to be ready"
        )
        headers = {"Authorization": f"Bearer {key}"}
        ids = [
            httpx.post(
                f"{base}/v1/jobs",
                json={"task": "demo.echo", "payload": {"p": p}, "priority": p},
                headers=headers,
            ).json()["id"]
            for p in ("high", "default", "low")
        ]
        for job_id in ids:
            wait_until(
                lambda job_id=job_id: (
                    httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json()["state"]
                    == "succeeded"
                ),
                timeout=60,
                interval=0.2,
                what=f"job {job_id} to succeed",
            )
        # Each worker counted its own queue's job on its own port; beat reports its lease.
        for offset, queue in enumerate(("high", "default", "low")):
            finished = f'conveyor_jobs_finished_total{{queue="{queue}",state="succeeded",'
            wait_until(
                lambda offset=offset, finished=finished: (
                    finished in _text(f"http://127.0.0.1:{metrics + offset}/metrics")
                ),
                timeout=10,
                what=f"the {queue} worker's metrics",
            )
        wait_until(
            lambda: "conveyor_beat_leader 1.0" in _text(f"http://127.0.0.1:{metrics + 3}/metrics"),
            timeout=20,
            what="beat's metrics",
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in psutil.Process(os.getpid()).children(recursive=True):
            if child.pid != process.pid and "conveyor" in " ".join(child.cmdline()):
                child.kill()


def free_ports_in_a_row(count: int) -> int:
    """The first of `count` consecutive loopback ports that are all free right now."""
    for _ in range(50):
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports")


def _text(url: str) -> str:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return ""


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
