"""`conveyor up` with real URLs: separate processes that run jobs and all stop on Ctrl-C."""

from __future__ import annotations

import os
import signal
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
    env = service_env(pg_url, redis_url, CONVEYOR_API_PORT=str(port))
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
        assert "api, worker-high, worker-default, worker-low, beat" in text
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


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
