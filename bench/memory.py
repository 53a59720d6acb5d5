"""Resident memory of a Conveyor worker against a bare Celery worker, in one run.

    uv run python -m bench.memory --jobs 300

Two phases run one after the other on the same Redis broker (a dedicated database number,
flushed before, between and after), with the worker flags of `bench.throughput`: pool
class, concurrency, prefetch multiplier, log level, `--without-mingle --without-gossip`.

(a) bare Celery: `celery -A bench.bare_app worker` is started and pinged until it answers
    (a remote-control ping over the broker), then N no-op messages are sent and drained.
(b) Conveyor: a fresh temporary PostgreSQL database is created and migrated,
    `conveyor worker --pool default` is started and pinged until it answers, then N
    `demo.echo` jobs are recorded and published through the outbox and drained until all
    are `succeeded`. The database is dropped afterwards.

Once a side has drained, the resident set (VmRSS of /proc/<pid>/status) of the worker's
main process and every process below it (the pool's children) is summed. RSS counts the
pages a forked child still shares with its parent in both, so the sum is what the
processes map, not what they cost the machine alone; PSS (/proc/<pid>/smaps_rollup),
which splits each shared page between the processes sharing it, is printed beside it.
Every wait has a deadline, and worker processes are killed (process group, SIGTERM then
SIGKILL) on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis
from celery import Celery
from sqlalchemy import text

from bench import bare_app, throughput
from bench.throughput import (
    PG_ADMIN_URL,
    Worker,
    positive_int,
    run_guarded,
    running_worker,
    temporary_pg_database,
    wait_for,
)
from conveyor.cli.wiring import build_platform, run_migrations

PING_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True)
class ProcessMemory:
    """One process's resident memory, in kibibytes."""

    pid: int
    role: str
    rss_kib: int
    anon_kib: int  # the part of RSS that is the process's heap and stacks, not files
    pss_kib: int


@dataclass(frozen=True)
class Footprint:
    """What one side's worker held after its drain."""

    name: str
    processes: list[ProcessMemory]

    @property
    def rss_mib(self) -> float:
        """The summed RSS of every process, in MiB."""
        return sum(p.rss_kib for p in self.processes) / 1024

    @property
    def anon_mib(self) -> float:
        """The summed anonymous RSS of every process, in MiB."""
        return sum(p.anon_kib for p in self.processes) / 1024

    @property
    def pss_mib(self) -> float:
        """The summed PSS of every process, in MiB."""
        return sum(p.pss_kib for p in self.processes) / 1024


# --------------------------------------------------------------------------- /proc


def _status_field(pid: int, field: str) -> int:
    """A kibibyte (or plain number) field of /proc/<pid>/status; 0 once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def descendants(root: int) -> list[int]:
    """Every live process below `root`, found through the parent ids in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        ppid = _status_field(int(entry.name), "PPid")
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    frontier = [root]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return sorted(found)


def footprint(name: str, worker: Worker) -> Footprint:
    """The resident memory of the worker's main process and of every process below it."""
    worker.check_alive()
    main = worker.process.pid
    pids = [(main, "main"), *((pid, "child") for pid in descendants(main))]
    return Footprint(
        name,
        [
            ProcessMemory(
                pid,
                role,
                rss_kib=_status_field(pid, "VmRSS"),
                anon_kib=_status_field(pid, "RssAnon"),
                pss_kib=_pss_kib(pid),
            )
            for pid, role in pids
        ],
    )


# --------------------------------------------------------------------------- the two sides


def wait_ready(control: Celery, worker: Worker, opts: throughput.Options) -> None:
    """Wait until the worker answers a remote-control ping over the broker."""
    wait_for(
        lambda: bool(control.control.ping(timeout=PING_TIMEOUT_SECONDS)),
        timeout=opts.boot_timeout,
        what=f"the {worker.name} worker to answer a ping",
        worker=worker,
    )


def measure_bare(opts: throughput.Options, client: redis.Redis, logs: Path) -> Footprint:
    """Start a bare Celery worker, wait for it, drain N no-op messages, measure it."""
    control = bare_app.make_app(opts.broker, opts.prefetch)

    def done() -> int:
        return int(client.get(bare_app.DONE_KEY) or 0)

    argv = throughput.bare_worker_argv(opts)
    env = throughput.bare_worker_env(opts)
    try:
        with running_worker("bare", argv, env, logs) as worker:
            wait_ready(control, worker, opts)
            throughput.send_bare_jobs(opts)
            wait_for(
                lambda: done() >= opts.jobs,
                timeout=opts.drain_timeout,
                what="the bare drain",
                worker=worker,
                progress=lambda: f"{done()}/{opts.jobs} done",
            )
            return footprint("bare Celery", worker)
    finally:
        control.close()


def measure_conveyor(opts: throughput.Options, logs: Path) -> Footprint:
    """Start `conveyor worker --pool default`, wait for it, drain N jobs, measure it."""
    with temporary_pg_database(opts.pg_admin_url) as database_url:
        settings = throughput.conveyor_settings(opts, database_url)
        run_migrations(settings)
        platform = build_platform(settings)
        sessions = platform.sessions

        def succeeded() -> int:
            with sessions() as session:
                sql = text("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
                return int(session.execute(sql).scalar_one())

        argv = throughput.conveyor_worker_argv(opts)
        env = throughput.conveyor_worker_env(opts, settings)
        try:
            with running_worker("conveyor", argv, env, logs) as worker:
                wait_ready(platform.celery, worker, opts)
                throughput.submit_conveyor_jobs(opts, platform)
                wait_for(
                    lambda: succeeded() >= opts.jobs,
                    timeout=opts.drain_timeout,
                    what="the Conveyor drain",
                    worker=worker,
                    progress=lambda: f"{succeeded()}/{opts.jobs} succeeded",
                )
                return footprint("Conveyor", worker)
        finally:
            platform.celery.close()
            platform.store.dispose()


# --------------------------------------------------------------------------- report


def report(opts: throughput.Options, bare: Footprint, conveyor: Footprint) -> str:
    """The side-by-side table, with each process below its side's total."""
    header = (
        f"{opts.jobs} jobs drained per side | broker {opts.broker} | pool {opts.pool} | "
        f"concurrency {opts.concurrency} | prefetch {opts.prefetch} | loglevel {opts.loglevel}"
    )
    columns = f"{'':<18}{'processes':>10}{'RSS MiB':>10}{'anon MiB':>10}{'PSS MiB':>10}"
    lines = [header, "", columns, "-" * len(columns)]
    for side in (bare, conveyor):
        lines.append(
            f"{side.name:<18}{len(side.processes):>10}{side.rss_mib:>10.1f}"
            f"{side.anon_mib:>10.1f}{side.pss_mib:>10.1f}"
        )
        for process in side.processes:
            lines.append(
                f"{'  ' + process.role + ' ' + str(process.pid):<18}{'':>10}"
                f"{process.rss_kib / 1024:>10.1f}{process.anon_kib / 1024:>10.1f}"
                f"{process.pss_kib / 1024:>10.1f}"
            )
    lines.append(
        f"{'Conveyor / bare':<18}{'':>10}{conveyor.rss_mib / bare.rss_mib:>9.2f}x"
        f"{conveyor.anon_mib / bare.anon_mib:>9.2f}x{conveyor.pss_mib / bare.pss_mib:>9.2f}x"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> throughput.Options:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory",
        description="Resident memory of a Conveyor worker against bare Celery.",
    )
    parser.add_argument("--jobs", type=positive_int, default=300, help="jobs per side")
    parser.add_argument(
        "--broker",
        default="redis://127.0.0.1:6379/9",
        help="a Redis URL with a dedicated database number, FLUSHED before, between and after",
    )
    parser.add_argument("--concurrency", type=positive_int, default=2, help="worker pool size")
    parser.add_argument("--pool", choices=("prefork", "threads", "solo"), default="prefork")
    parser.add_argument("--prefetch", type=positive_int, default=4, help="prefetch multiplier")
    parser.add_argument(
        "--loglevel",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="INFO",
        help="worker log level, both sides (INFO is Conveyor's default)",
    )
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the db")
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="seconds per side")
    parser.add_argument("--boot-timeout", type=float, default=60.0, help="seconds per worker")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    args = parser.parse_args(argv)
    url = urlsplit(args.broker)
    if url.scheme not in ("redis", "rediss") or url.path.strip("/") in ("", "0"):
        parser.error(
            "--broker must be a redis:// URL naming a database other than 0 (it is flushed)"
        )
    return throughput.Options(
        jobs=args.jobs,
        broker=args.broker,
        concurrency=args.concurrency,
        pool=args.pool,
        prefetch=args.prefetch,
        batch=500,
        loglevel=args.loglevel,
        pg_admin_url=args.pg_admin_url,
        enqueue_timeout=args.drain_timeout,
        drain_timeout=args.drain_timeout,
        boot_timeout=args.boot_timeout,
        keep_logs=args.keep_logs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both sides and print the table; 0 on success, 1 on a failed run."""
    opts = parse_args(argv)

    def body(client: redis.Redis, logs: Path) -> bool:
        print(f"(a) bare Celery: {opts.jobs} jobs ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        bare = measure_bare(opts, client, logs)
        throughput.flush_broker(client)
        print(f"(b) Conveyor: {opts.jobs} jobs ...", file=sys.stderr, flush=True)
        conveyor = measure_conveyor(opts, logs)
        print(report(opts, bare, conveyor), flush=True)
        print(f"({time.monotonic() - started:.0f}s on {os.cpu_count()} CPUs)", file=sys.stderr)
        return True

    return run_guarded(
        opts.broker, prefix="conveyor-memory-", keep_logs=opts.keep_logs, kept="worker", body=body
    )


if __name__ == "__main__":
    sys.exit(main())
