"""`conveyor flower` as operators run it: refused without credentials, behind basic auth with.

Real processes on real services: a `conveyor worker` on PostgreSQL and Redis database 12
(kept apart from the other acceptance tests, which use database 7), and `conveyor flower`
on a free port, asked over HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from tests import workers
from tests.support import ROOT, conveyor_command, free_port, require_port, wait_until

USER = "ops"
# A comma and a colon inside: Flower's own FLOWER_BASIC_AUTH would split this password into
# two credentials, "ops:first-half" and "intruder:second-half", each opening the door alone.
PASSWORD = "first-half,intruder:second-half"
# Set in Flower's environment as if left over from elsewhere: it must not open Flower.
INHERITED = ("leftover", "credentials")
Result = subprocess.CompletedProcess[str]


@pytest.fixture
def broker_url() -> Iterator[str]:
    """Redis database 12, empty before and after the test."""
    require_port("Redis", "127.0.0.1", 6379)
    url = "redis://127.0.0.1:6379/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def run_flower(env: dict[str, str]) -> Result:
    """`conveyor flower` to completion with exactly this environment."""
    return subprocess.run(
        conveyor_command("flower"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_flower_refuses_to_start_without_both_credentials(pg_url: str, broker_url: str) -> None:
    base = workers.service_env(pg_url, broker_url, CONVEYOR_FLOWER_PORT=str(free_port()))
    cases: list[tuple[str, dict[str, str]]] = [
        ("no credentials", {}),
        ("only the user", {"CONVEYOR_FLOWER_USER": USER}),
        ("only the password", {"CONVEYOR_FLOWER_PASSWORD": PASSWORD}),
        ("an empty user", {"CONVEYOR_FLOWER_USER": "", "CONVEYOR_FLOWER_PASSWORD": PASSWORD}),
        ("an empty password", {"CONVEYOR_FLOWER_USER": USER, "CONVEYOR_FLOWER_PASSWORD": ""}),
    ]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(lambda case: run_flower({**base, **case[1]}), cases))

    for (name, _), result in zip(cases, results, strict=True):
        assert result.returncode == 2, f"{name}: exit {result.returncode}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{name}: {result.stderr}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"{name}: {len(lines)} stderr lines:\n{result.stderr}"
        assert lines[0].startswith("conveyor: Flower needs "), f"{name}: {lines[0]!r}"
        assert "CONVEYOR_FLOWER_USER" in lines[0], f"{name}: {lines[0]!r}"
        assert "CONVEYOR_FLOWER_PASSWORD" in lines[0], f"{name}: {lines[0]!r}"
        assert PASSWORD not in result.stderr + result.stdout, f"{name} printed the password"
        assert result.stdout == "", f"{name}: {result.stdout!r}"


@dataclass
class Running:
    """A worker and Flower in front of it."""

    worker: subprocess.Popen[bytes]
    flower: subprocess.Popen[bytes]
    url: str
    flower_log: Path

    def get(self, path: str, auth: tuple[str, str] | None = None) -> httpx.Response:
        """One request to Flower, as a browser or a script would send it."""
        return httpx.get(f"{self.url}{path}", auth=auth, timeout=5)

    def flower_alive(self) -> None:
        """Fail at once, with its log, when Flower has exited."""
        if self.flower.poll() is not None:
            raise AssertionError(
                f"`conveyor flower` exited with {self.flower.returncode}:\n"
                f"{self.flower_log.read_text()}"
            )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever of it is left."""
    workers.stop(process, timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def running(pg_url: str, broker_url: str, tmp_path: Path) -> Iterator[Running]:
    """`conveyor worker --pool default` and `conveyor flower` with credentials, on a free port."""
    port = free_port()
    worker_env = workers.service_env(pg_url, broker_url)
    flower_env = {
        **workers.service_env(
            pg_url,
            broker_url,
            CONVEYOR_API_HOST="127.0.0.1",
            CONVEYOR_FLOWER_PORT=str(port),
            CONVEYOR_FLOWER_USER=USER,
            CONVEYOR_FLOWER_PASSWORD=PASSWORD,
            FLOWER_BASIC_AUTH=":".join(INHERITED),
        ),
        # The most talkative level, so the log check below has everything to look at.
        "CONVEYOR_LOG_LEVEL": "DEBUG",
    }
    flower_log = tmp_path / "flower.log"
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(
            workers.start(
                ["worker", "--pool", "default", "--concurrency", "1"],
                worker_env,
                tmp_path / "worker.log",
            )
        )
        started.append(workers.start(["flower"], flower_env, flower_log))
        yield Running(started[0], started[1], f"http://127.0.0.1:{port}", flower_log)
    finally:
        for process in started:
            stop(process)


def answers(running: Running) -> bool:
    """Whether Flower's HTTP server answers at all."""
    running.flower_alive()
    try:
        return running.get("/healthcheck").status_code == 200
    except httpx.TransportError:
        return False


def listed_worker(running: Running, prefix: str) -> tuple[str, dict[str, Any]] | None:
    """The worker whose name starts with `prefix`, once Flower has its queues."""
    running.flower_alive()
    response = running.get("/api/workers?refresh=1", auth=(USER, PASSWORD))
    assert response.status_code == 200, response.text
    for name, info in response.json().items():
        if name.startswith(prefix) and info.get("active_queues"):
            return name, info
    return None


def online_on_page(running: Running, name: str) -> dict[str, Any] | None:
    """The workers page's row for `name`, once that worker is seen online."""
    running.flower_alive()
    response = running.get("/workers?json=1", auth=(USER, PASSWORD))
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["data"]
    return next((row for row in rows if row.get("hostname") == name and row["status"]), None)


def test_flower_answers_401_without_auth_and_shows_the_worker_with_it(
    running: Running,
) -> None:
    wait_until(lambda: answers(running), timeout=60, interval=0.2, what="Flower to answer")

    wrong: list[tuple[str, tuple[str, str] | None]] = [
        ("no credentials", None),
        ("a wrong password", (USER, "not-the-password")),
        ("a wrong user", ("admin", PASSWORD)),
        ("the password's first half", (USER, "first-half")),
        ("the password's second half", ("intruder", "second-half")),
        ("inherited FLOWER_BASIC_AUTH", INHERITED),
    ]
    for path in ("/", "/workers", "/api/workers", "/api/workers?refresh=1", "/api/tasks"):
        for name, auth in wrong:
            response = running.get(path, auth=auth)
            assert response.status_code == 401, f"GET {path} with {name}: {response.status_code}"
            if not path.startswith("/api/"):
                # Pages ask a browser for credentials; the API just refuses.
                assert response.headers.get("WWW-Authenticate", "").startswith("Basic"), path

    prefix = f"default-{running.worker.pid}@"
    found = wait_until(
        lambda: listed_worker(running, prefix),
        timeout=60,
        interval=0.5,
        what=f"Flower to list worker {prefix}…",
    )
    assert found is not None
    name, info = found
    assert [queue["name"] for queue in info["active_queues"]] == ["default"]
    assert "conveyor.run" in info["registered"]
    # The worker's Celery configuration as Flower reads it: JSON only, no result backend.
    assert info["conf"]["accept_content"] == ["json"]
    assert info["conf"]["task_ignore_result"] is True

    # The workers page, built from the worker's events (heartbeats), names it as online.
    online = wait_until(
        lambda: online_on_page(running, name),
        timeout=60,
        interval=0.5,
        what=f"the workers page to show {name} online",
    )
    assert online["status"] is True
    page = running.get("/", auth=(USER, PASSWORD))
    assert page.status_code == 200
    assert name in page.text

    # The password reaches Flower through its own process, never its argv or its log.
    assert all(PASSWORD not in arg for arg in psutil.Process(running.flower.pid).cmdline())
    log = running.flower_log.read_text()
    assert "first-half" not in log and "second-half" not in log
