"""A newcomer's first hour: the CLI beside a running `conveyor up` (the embedded platform)
sees its jobs start at once; `--wait` with nothing running says so within seconds and how
to start it; the platform's terminal shows what matters at INFO, not Celery's chatter."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, conveyor_command, free_port, run_conveyor, wait_until


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    found = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    found.update(
        CONVEYOR_DATABASE_URL=f"sqlite:///{tmp_path / 'conveyor.db'}",
        CONVEYOR_API_PORT=str(free_port()),
        CONVEYOR_METRICS_PORT="0",
        CONVEYOR_HEALTH_LOG_SECONDS="2",
    )
    return found


class Up:
    """`conveyor up` as its own process, its terminal captured."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.out = out
        self.env = env
        handle = out.open("wb")
        self.process = subprocess.Popen(
            conveyor_command("up"),
            env=env,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{env['CONVEYOR_API_PORT']}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=60, what="`conveyor up` to answer")

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def up(env: dict[str, str], tmp_path: Path) -> Iterator[Up]:
    found = Up(env, tmp_path / "up.txt")
    try:
        yield found
    finally:
        found.stop()


def seconds_to_start(job: dict[str, object]) -> float:
    created = dt.datetime.fromisoformat(str(job["created_at"]))
    started = dt.datetime.fromisoformat(str(job["started_at"]))
    return (started - created).total_seconds()


def test_the_cli_beside_a_running_platform_sees_its_jobs_start_at_once(
    up: Up, env: dict[str, str]
) -> None:
    for _ in range(3):
        begun = time.monotonic()
        done = run_conveyor("submit", "demo.echo", "--payload", '{"n": 1}', "--wait", env=env)
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert job["state"] == "succeeded" and job["result"] == {"n": 1}
        # Recorded by the command, published by the platform at once: no relay delay.
        assert seconds_to_start(job) < 1.0, job
        assert time.monotonic() - begun < 15
    # What the command hands over goes through the platform for a workflow too.
    flow = Path(up.out.parent / "flow.json")
    flow.write_text(
        json.dumps(
            {
                "steps": [
                    {"key": "a", "task": "demo.echo"},
                    {"key": "b", "task": "demo.echo", "after": ["a"]},
                ]
            }
        )
    )
    ran = run_conveyor("workflows", "submit", str(flow), "--wait", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "succeeded" in ran.stdout.splitlines()[0]


def test_wait_with_no_platform_running_says_so_and_how_to_start_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    assert run_conveyor("migrate", env=env).returncode == 0
    begun = time.monotonic()
    waited = run_conveyor("submit", "demo.echo", "--payload", "{}", "--wait", env=env)
    took = time.monotonic() - begun
    assert waited.returncode == 1
    line = waited.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "nothing is consuming queue 'default'" in line and "make run" in line
    assert took < 10, f"took {took:.1f} s"
    job_id = re.search(r"job ([0-9a-f-]{36})", line)
    assert job_id is not None
    # The job was kept: the platform, once started, runs it.
    platform = Up(env, tmp_path / "later.txt")
    try:

        def finished() -> bool:
            shown = run_conveyor("jobs", "show", job_id.group(1), env=env)
            return json.loads(shown.stdout)["state"] == "succeeded"

        wait_until(finished, timeout=60, interval=0.5, what="the kept job to run")
    finally:
        platform.stop()


def test_wait_on_a_real_broker_with_no_worker_names_the_worker_command(
    pg_url: str, env: dict[str, str]
) -> None:
    env = {
        **env,
        "CONVEYOR_DATABASE_URL": pg_url,
        "CONVEYOR_BROKER_URL": "redis://127.0.0.1:6379/9",
    }
    assert run_conveyor("migrate", env=env).returncode == 0
    waited = run_conveyor(
        "submit", "demo.echo", "--payload", "{}", "--priority", "low", "--wait", env=env
    )
    assert waited.returncode == 1
    assert "nothing is consuming queue 'low'" in waited.stderr
    assert "conveyor worker --pool low" in waited.stderr


def test_the_platform_terminal_shows_what_matters_and_not_celery_chatter(
    up: Up, env: dict[str, str]
) -> None:
    for _ in range(3):
        assert (
            run_conveyor("submit", "demo.echo", "--payload", "{}", "--wait", env=env).returncode
            == 0
        )
    dead = run_conveyor(
        "submit",
        "demo.fail",
        "--payload",
        '{"failures": 1, "retryable": false}',
        "--wait",
        env=env,
    )
    assert dead.returncode == 1
    wait_until(lambda: "job dead" in up.text(), timeout=10, what="the dead job's line")
    wait_until(lambda: "platform health" in up.text(), timeout=30, what="a health line")
    text = up.text()
    assert f"127.0.0.1:{env['CONVEYOR_API_PORT']}/ui/" in text
    assert re.search(r"Admin API key \(shown once\): cvk_", text)
    for chatter in (
        "Task conveyor.run",  # Celery's per-task received/succeeded lines
        "Sending due task",  # beat's maintenance ticks
        "conveyor.relay",
        "Connected to memory",
        "No hostname was supplied",
        "setup plugin",
    ):
        assert chatter not in text, f"{chatter!r} printed at INFO:\n{text}"
