"""Processes under test: started in their own process group, waited on, measured, stopped.

Every wait here is a condition with a deadline; a process is stopped (SIGTERM to its group,
then SIGKILL) however the block that started it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 15.0


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


class Worker:
    """A process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file: TextIO = log.open("w")
        self.started_at = time.time()
        self.process = subprocess.Popen(
            list(argv),
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        """Raise when the process has exited."""
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with {code}\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        """The last lines of the process's output."""
        self._log_file.flush()
        try:
            text_lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text_lines[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after a grace period; always returns."""
        try:
            if self.process.poll() is None:
                _signal_group(self.process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=STOP_GRACE_SECONDS)
            # Pool children may outlive their parent: sweep the whole group regardless.
            _signal_group(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        finally:
            self._log_file.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def running_worker(
    name: str, argv: Sequence[str], env: dict[str, str], logs: Path
) -> Iterator[Worker]:
    """Start a process; it is stopped when the block ends, however it ends."""
    worker = Worker(name, argv, env, logs / f"{name}.log")
    try:
        yield worker
    finally:
        worker.stop()


def raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    """A signal handler that turns SIGTERM into KeyboardInterrupt, so cleanup runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def worker_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a child process: ours, with the project importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    worker: Worker | None = None,
    progress: Callable[[], str] | None = None,
    interval: float = POLL_SECONDS,
) -> None:
    """Poll `condition` every `interval` seconds until true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            detail = f" ({progress()})" if progress else ""
            tail = f"\n{worker.tail()}" if worker else ""
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{tail}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(process: Worker, base: str, path: str, timeout: float) -> None:
    """Poll GET `path` until it answers 200; raise when the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=2.0) as client:
        while True:
            process.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if client.get(path).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{process.name} did not answer {path} within {timeout:.0f}s\n{process.tail()}"
                )
            time.sleep(0.1)


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_memory_mb(pgid: int) -> tuple[float, float, int] | None:
    """RSS and PSS summed over every process in a process group, in MB, and how many.

    A worker started by `running_worker` leads its own group, so this is the main process
    and its pool children. RSS counts pages shared between a prefork parent and its
    children once per process; PSS splits them. None off Linux or for an empty group.
    """
    rss = pss = 0.0
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            rollup = (entry / "smaps_rollup").read_text()
        except (OSError, ValueError, IndexError):
            continue
        fields = {line.split(":")[0]: line.split()[1] for line in rollup.splitlines()[1:]}
        rss += int(fields.get("Rss", 0)) / 1024
        pss += int(fields.get("Pss", 0)) / 1024
        count += 1
    return (rss, pss, count) if count else None
