"""Real Conveyor worker processes for tests, started and stopped around a test."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import ROOT, conveyor_command


def service_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """The environment of a Conveyor process on these services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(
        CONVEYOR_DATABASE_URL=database_url,
        CONVEYOR_BROKER_URL=broker_url,
        CONVEYOR_LOG_LEVEL=os.environ.get("CONVEYOR_TEST_LOG_LEVEL", "WARNING"),
        # Many processes share this machine: a test that reads metrics names its ports.
        CONVEYOR_METRICS_PORT="0",
        # Tests deliver webhooks to receivers on this machine, which the guard refuses.
        CONVEYOR_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8,::1/128",
    )
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a `conveyor` subcommand in its own process group, logging to a file."""
    handle = log.open("ab")
    return subprocess.Popen(
        conveyor_command(*args),
        env=env,
        cwd=ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@contextmanager
def running(
    commands: list[list[str]], env: dict[str, str], logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes that live for the duration of the block."""
    processes = [start(args, env, logs / f"{'-'.join(args)}.log") for args in commands]
    try:
        yield processes
    finally:
        for process in processes:
            stop(process)
