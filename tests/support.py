"""Helpers shared by the test tiers: waiting on conditions, service URLs, processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("CONVEYOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST_PORT = ("127.0.0.1", 6379)
AMQP_HOST_PORT = ("127.0.0.1", 5672)

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def require_port(name: str, host: str, port: int) -> None:
    """Fail (never skip) with a clear message when a real service does not answer."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as error:
        raise RuntimeError(
            f"{name} does not answer on {host}:{port} ({error}); start it as .ci/run does"
        ) from None


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def temporary_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration; yields its SQLAlchemy URL."""
    require_port("PostgreSQL", "127.0.0.1", 5432)
    name = f"conveyor_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def conveyor_command(*args: str) -> list[str]:
    """argv that runs the `conveyor` command with this interpreter."""
    return [sys.executable, "-m", "conveyor", *args]


def run_conveyor(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a `conveyor` command to completion, capturing its output."""
    return subprocess.run(
        conveyor_command(*args),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )
