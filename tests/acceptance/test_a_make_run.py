"""`make run` on the embedded default: the printed curl line gives a succeeded job fast.

Named to run first among the acceptance tests, on a machine not yet busy with their
workers, since it times a two-second promise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.support import ROOT, free_port, wait_until


def test_make_run_prints_a_curl_line_that_runs_a_job(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_API_PORT=str(port),
        CONVEYOR_DATABASE_URL=f"sqlite:///{tmp_path / 'conveyor.db'}",
    )
    out = (tmp_path / "out.txt").open("w+")
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        banner = wait_until(
            lambda: (text := Path(out.name).read_text()) and "Then read it back" in text and text,
            timeout=120,
            interval=0.2,
            what="the banner of `conveyor up`",
        )
        curl = next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl"))
        key = re.search(r"Admin API key \(shown once\): (\S+)", banner)
        assert key is not None
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
            timeout=30,
            what="the API to answer",
        )
        started = time.monotonic()
        submitted = subprocess.run(shlex.split(curl), capture_output=True, text=True, check=True)
        job = json.loads(submitted.stdout)
        assert job["state"] in ("queued", "running", "succeeded")
        headers = {"Authorization": f"Bearer {key.group(1)}"}
        done = wait_until(
            lambda: (
                (
                    b := httpx.get(
                        f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", headers=headers
                    ).json()
                )["state"]
                == "succeeded"
                and b
            ),
            timeout=2.0,
            interval=0.02,
            what="the job to succeed within 2 s",
        )
        assert time.monotonic() - started < 2.0
        assert done["result"] == {"hello": "world"}
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode is not None
