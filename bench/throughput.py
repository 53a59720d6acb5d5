"""Throughput of Conveyor's full job path against bare Celery, in one run, side by side.

    uv run python -m bench.throughput --jobs 20000

Two phases run one after the other on the same broker (Redis: a dedicated database
number, flushed before, between and after; or RabbitMQ: the known queues purged) with the
same worker flags: pool class, concurrency, prefetch multiplier, log level,
`--without-mingle --without-gossip`. The bare side takes Conveyor's own Celery configuration
(JSON only, the `default` queue, acks_late) or, with `--bare-config celery`, Celery's
defaults (the `celery` queue, early acks, no publisher confirms).

(a) bare Celery (`bench.bare_app`): N no-op messages are sent with `apply_async` on one
    reused producer (timed: enqueue), then one `celery worker` process is started and the
    drain is timed. The task records its completion in Redis (the broker's database, or
    `bare_app.RECORD_URL` on RabbitMQ; one Lua call: a counter and the earliest and latest
    completion times).
(b) Conveyor: a fresh temporary PostgreSQL database is created and migrated, N `demo.echo`
    jobs with payload {} are recorded and published through the outbox
    (`conveyor.jobs.outbox.submit` with the CeleryPublisher of `build_platform`) in batches
    (timed: enqueue, covering payload validation, the INSERTs, the publish and the
    `published_at` UPDATE), then one `conveyor worker --pool default` process is started
    and the drain is timed until every job is `succeeded` in the jobs table, which is
    polled every 0.2 s. The database is dropped afterwards.

Workers start only once the queue holds all N messages, so the drain measures worker
throughput alone. The drain clock runs from the FIRST completion to the LAST one
(rate = (N - 1) / that span), taken from the completion timestamps the workers write
(Redis for bare Celery, `jobs.finished_at` for Conveyor); worker boot, from process start
to the first completion, is reported separately. Every wait has a deadline, and worker
processes are killed (process group, SIGTERM then SIGKILL) on success, error or Ctrl-C.

What differs on the wire: Conveyor's messages also carry soft/hard time limits and two
headers (its publisher sets them); both sides log each task at the same `--loglevel`.
The 1-minute load average printed per side includes the benchmark's own processes; on a
shared machine a much higher figure means the two sides did not run under equal load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import text

from bench import bare_app
from bench.brokers import BARE_QUEUE, BenchBroker, check_bench_broker
from bench.databases import PG_ADMIN_URL, temporary_pg_database
from bench.harness import positive_int, run_guarded
from bench.processes import (
    BenchError,
    Worker,
    group_memory_mb,
    running_worker,
    wait_for,
    worker_env,
)
from conveyor.cli.wiring import Platform, build_platform, run_migrations
from conveyor.config import Settings
from conveyor.jobs import outbox
from conveyor.jobs.models import NewJob
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

QUEUE = "default"


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    jobs: int
    broker: str
    concurrency: int
    pool: str
    prefetch: int
    batch: int
    loglevel: str
    pg_admin_url: str
    enqueue_timeout: float
    drain_timeout: float
    boot_timeout: float
    keep_logs: bool
    bare_config: str = "conveyor"
    task_events: bool = False

    @property
    def bare_queue(self) -> str:
        """The queue the bare side sends to and consumes."""
        return QUEUE if self.bare_config == "conveyor" else BARE_QUEUE


@dataclass(frozen=True)
class Result:
    """What one side measured; times in seconds."""

    name: str
    jobs: int
    enqueue_seconds: float
    boot_seconds: float
    drain_seconds: float  # first completion to last completion
    wall_seconds: float  # worker start to last completion
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at drain start and end
    # RSS and PSS in MB of the worker's process group after the drain, and how many processes.
    memory: tuple[float, float, int] | None = None

    @property
    def enqueue_rate(self) -> float:
        """Jobs enqueued per second."""
        return self.jobs / self.enqueue_seconds if self.enqueue_seconds > 0 else float("inf")

    @property
    def drain_rate(self) -> float:
        """Jobs completed per second between the first completion and the last."""
        if self.jobs < 2 or self.drain_seconds <= 0:
            return float("nan")
        return (self.jobs - 1) / self.drain_seconds

    @property
    def wall_rate(self) -> float:
        """Jobs completed per second from worker start (boot included) to the last completion."""
        return self.jobs / self.wall_seconds if self.wall_seconds > 0 else float("nan")


# What a caller may do with a worker once it has drained its queue and sits idle, before
# it is measured and stopped.
BareHook = Callable[[Worker, Celery, redis.Redis], None]
ConveyorHook = Callable[[Worker, Platform], None]


def check_queue_length(broker: BenchBroker, queue: str, expected: int) -> None:
    """Fail unless the queue holds exactly the messages just sent."""
    length = broker.depth(queue)
    if length != expected:
        raise BenchError(f"queue {queue!r} holds {length} messages after enqueue, not {expected}")


def wait_drained(
    opts: Options, worker: Worker, side: str, done: Callable[[], int], drained: Callable[[], bool]
) -> tuple[float, float]:
    """Wait for the first completion (boot), then for the drain; the 1-minute load average
    at the drain's start and end."""
    wait_for(
        lambda: done() >= 1,
        timeout=opts.boot_timeout,
        what=f"the {side} worker's first completion",
        worker=worker,
    )
    load_start = os.getloadavg()[0]
    wait_for(
        drained,
        timeout=opts.drain_timeout,
        what=f"the {side} drain",
        worker=worker,
        progress=lambda: f"{done()}/{opts.jobs} done",
    )
    return load_start, os.getloadavg()[0]


# --------------------------------------------------------------------------- (a) bare Celery


def enqueue_bare(app: Celery, jobs: int, timeout: float) -> float:
    """Send `jobs` no-op messages with `apply_async` on one reused producer; the seconds."""
    task = app.tasks[bare_app.NOOP_TASK]
    deadline = time.monotonic() + timeout
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i in range(jobs):
            task.apply_async(args=[str(uuid.uuid4())], producer=producer)
            if i % 1000 == 0 and time.monotonic() > deadline:
                raise BenchError(f"bare enqueue took over {timeout:.0f}s")
    return time.perf_counter() - started


def bare_worker_argv(opts: Options) -> list[str]:
    """`celery worker` with the flags `conveyor worker` passes to Celery."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.bare_app",
        "worker",
        "--queues",
        opts.bare_queue,
        "--concurrency",
        str(opts.concurrency),
        "--prefetch-multiplier",
        str(opts.prefetch),
        "--pool",
        opts.pool,
        "--hostname",
        "bare@%h",
        "--loglevel",
        opts.loglevel,
        "--without-mingle",
        "--without-gossip",
        *(["--task-events"] if opts.task_events else []),
    ]


def run_bare(
    opts: Options, broker: BenchBroker, logs: Path, after_drain: BareHook | None = None
) -> Result:
    """Enqueue N no-op messages with one producer, then drain them with one worker process."""
    record_url = bare_app.record_url_for(opts.broker)
    app = bare_app.make_app(
        opts.broker, opts.prefetch, config=opts.bare_config, record_url=record_url
    )
    client = redis.Redis.from_url(record_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        client.delete(bare_app.DONE_KEY, bare_app.FIRST_KEY, bare_app.LAST_KEY)
        client.delete(bare_app.STARTS_KEY)
        enqueue_seconds = enqueue_bare(app, opts.jobs, opts.enqueue_timeout)
        check_queue_length(broker, opts.bare_queue, opts.jobs)
        env = worker_env(
            {
                "BENCH_BROKER_URL": opts.broker,
                "BENCH_PREFETCH": str(opts.prefetch),
                "BENCH_BARE_CONFIG": opts.bare_config,
                "BENCH_RECORD_URL": record_url,
            }
        )

        def done() -> int:
            return int(client.get(bare_app.DONE_KEY) or 0)

        with running_worker("bare", bare_worker_argv(opts), env, logs) as worker:
            load = wait_drained(opts, worker, "bare", done, lambda: done() >= opts.jobs)
            first = float(client.get(bare_app.FIRST_KEY) or 0)
            last = float(client.get(bare_app.LAST_KEY) or 0)
            count = done()
            memory = group_memory_mb(worker.process.pid)
            if after_drain is not None:
                after_drain(worker, app, client)
    finally:
        client.close()
        app.close()
    if count != opts.jobs:
        raise BenchError(f"bare Celery ran {count} tasks for {opts.jobs} messages")
    return Result(
        "bare Celery",
        opts.jobs,
        enqueue_seconds,
        boot_seconds=first - worker.started_at,
        drain_seconds=last - first,
        wall_seconds=last - worker.started_at,
        load=load,
        memory=memory,
    )


# --------------------------------------------------------------------------- (b) Conveyor


def run_conveyor(
    opts: Options, broker: BenchBroker, logs: Path, after_drain: ConveyorHook | None = None
) -> Result:
    """Record and publish N demo.echo jobs, then drain them with one `conveyor worker`."""
    with temporary_pg_database(opts.pg_admin_url) as database_url:
        settings = Settings(
            database_url=database_url,
            broker_url=opts.broker,
            prefetch_multiplier=opts.prefetch,
            worker_pool_class=opts.pool,
            log_level=opts.loglevel,
        )
        run_migrations(settings)
        platform = build_platform(settings)
        try:
            return _conveyor_phase(opts, settings, platform, broker, logs, after_drain)
        finally:
            platform.celery.close()
            platform.store.dispose()


def enqueue_conveyor(platform: Platform, jobs: int, batch: int, timeout: float) -> float:
    """Record and publish `jobs` demo.echo jobs through the outbox in batches; the seconds."""
    deadline = time.monotonic() + timeout
    started = time.perf_counter()
    for offset in range(0, jobs, batch):
        size = min(batch, jobs - offset)
        new: list[NewJob] = [
            build_new_job(registry, tenant="bench", task="demo.echo", payload={})
            for _ in range(size)
        ]
        outbox.submit(platform.sessions, platform.publisher, new)
        if time.monotonic() > deadline:
            raise BenchError(f"Conveyor enqueue took over {timeout:.0f}s")
    return time.perf_counter() - started


def conveyor_worker_env(opts: Options, settings: Settings) -> dict[str, str]:
    """The environment of a `conveyor worker` on these settings."""
    return worker_env(
        {
            "CONVEYOR_DATABASE_URL": settings.database_url,
            "CONVEYOR_BROKER_URL": opts.broker,
            "CONVEYOR_PREFETCH_MULTIPLIER": str(opts.prefetch),
            "CONVEYOR_WORKER_POOL_CLASS": opts.pool,
            "CONVEYOR_LOG_LEVEL": opts.loglevel,
            "CONVEYOR_TASK_EVENTS": "true" if opts.task_events else "false",
        }
    )


def _conveyor_phase(
    opts: Options,
    settings: Settings,
    platform: Platform,
    broker: BenchBroker,
    logs: Path,
    after_drain: ConveyorHook | None,
) -> Result:
    sessions = platform.sessions
    enqueue_seconds = enqueue_conveyor(platform, opts.jobs, opts.batch, opts.enqueue_timeout)

    def scalar(sql: str) -> int:
        with sessions() as session:
            return int(session.execute(text(sql)).scalar_one())

    # The marks of publication follow the publish by a moment (conveyor.jobs.marks).
    wait_for(
        lambda: scalar("SELECT count(*) FROM jobs WHERE published_at IS NULL") == 0,
        timeout=10,
        what="every recorded job marked published (see warnings)",
    )
    check_queue_length(broker, QUEUE, opts.jobs)

    argv = [
        sys.executable,
        "-m",
        "conveyor",
        "worker",
        "--pool",
        QUEUE,
        "--concurrency",
        str(opts.concurrency),
    ]
    succeeded_sql = "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
    failed_sql = "SELECT count(*) FROM jobs WHERE state IN ('retrying', 'dead', 'cancelled')"

    def succeeded() -> int:
        return scalar(succeeded_sql)

    def finished_all() -> bool:
        if scalar(failed_sql):
            raise BenchError("some demo.echo jobs failed; see the jobs table's error columns")
        return succeeded() >= opts.jobs

    with running_worker("conveyor", argv, conveyor_worker_env(opts, settings), logs) as worker:
        load = wait_drained(opts, worker, "Conveyor", succeeded, finished_all)
        with sessions() as session:
            row = session.execute(
                text(
                    "SELECT count(*), min(finished_at), max(finished_at) FROM jobs"
                    " WHERE state = 'succeeded'"
                )
            ).one()
        memory = group_memory_mb(worker.process.pid)
        if after_drain is not None:
            after_drain(worker, platform)
    count, first_at, last_at = int(row[0]), row[1], row[2]
    if count != opts.jobs:
        raise BenchError(f"Conveyor finished {count} of {opts.jobs} jobs")
    assert isinstance(first_at, dt.datetime) and isinstance(last_at, dt.datetime)
    first, last = first_at.timestamp(), last_at.timestamp()
    return Result(
        "Conveyor",
        opts.jobs,
        enqueue_seconds,
        boot_seconds=first - worker.started_at,
        drain_seconds=last - first,
        wall_seconds=last - worker.started_at,
        load=load,
        memory=memory,
    )


# --------------------------------------------------------------------------- report


def report(opts: Options, bare: Result, conveyor: Result) -> str:
    """The side-by-side table."""
    header = (
        f"{opts.jobs} jobs | broker {opts.broker} | pool {opts.pool} | "
        f"concurrency {opts.concurrency} | prefetch {opts.prefetch} | loglevel {opts.loglevel} | "
        f"Conveyor batch {opts.batch} | task events {'on' if opts.task_events else 'off'}"
    )
    clock = (
        "drain clock: first completion -> last completion, rate = (N-1)/span; "
        "boot = worker start -> first completion (excluded from drain); "
        f"load 1m = 1-minute load average at drain start->end on {os.cpu_count()} CPUs"
    )
    columns = (
        f"{'':<18}{'enqueue jobs/s':>15}{'drain jobs/s':>14}{'wall jobs/s':>13}"
        f"{'enqueue s':>11}{'boot s':>8}{'drain s':>9}{'load 1m':>14}"
    )
    lines = [header, clock, "", columns, "-" * len(columns)]
    for result in (bare, conveyor):
        lines.append(
            f"{result.name:<18}{result.enqueue_rate:>15.1f}{result.drain_rate:>14.1f}"
            f"{result.wall_rate:>13.1f}{result.enqueue_seconds:>11.2f}"
            f"{result.boot_seconds:>8.2f}{result.drain_seconds:>9.2f}"
            f"{f'{result.load[0]:.2f}->{result.load[1]:.2f}':>14}"
        )
    lines.append(
        f"{'Conveyor / bare':<18}{_ratio(conveyor.enqueue_rate, bare.enqueue_rate):>15}"
        f"{_ratio(conveyor.drain_rate, bare.drain_rate):>14}"
        f"{_ratio(conveyor.wall_rate, bare.wall_rate):>13}"
    )
    return "\n".join(lines)


def _ratio(ours: float, theirs: float) -> str:
    if theirs <= 0 or theirs != theirs or ours != ours:
        return "n/a"
    return f"{ours / theirs:.3f}x"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Options:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Conveyor's job throughput against bare Celery on the same broker.",
    )
    parser.add_argument("--jobs", type=positive_int, default=20000, help="jobs per side")
    parser.add_argument(
        "--broker",
        default="redis://127.0.0.1:6379/9",
        help="a Redis URL with a dedicated database number, FLUSHED before, between and after; "
        "or an amqp:// URL, whose Conveyor and bare queues are PURGED",
    )
    parser.add_argument("--concurrency", type=positive_int, default=2, help="worker pool size")
    parser.add_argument("--pool", choices=("prefork", "threads", "solo"), default="prefork")
    parser.add_argument("--prefetch", type=positive_int, default=4, help="prefetch multiplier")
    parser.add_argument("--batch", type=positive_int, default=500, help="Conveyor submit batch")
    parser.add_argument(
        "--loglevel",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="INFO",
        help="worker log level, both sides (INFO is Conveyor's default)",
    )
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the db")
    parser.add_argument("--enqueue-timeout", type=float, default=600.0, help="seconds per side")
    parser.add_argument("--drain-timeout", type=float, default=900.0, help="seconds per side")
    parser.add_argument("--boot-timeout", type=float, default=60.0, help="seconds per worker")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    parser.add_argument(
        "--bare-config",
        choices=bare_app.CONFIGS,
        default="conveyor",
        help="the bare side's Celery configuration: Conveyor's own, or Celery's defaults",
    )
    parser.add_argument(
        "--task-events",
        action="store_true",
        help="workers send Celery's task events, both sides (as once Flower has connected)",
    )
    args = parser.parse_args(argv)
    check_bench_broker(parser, args.broker, amqp=True)
    return Options(
        jobs=args.jobs,
        broker=args.broker,
        concurrency=args.concurrency,
        pool=args.pool,
        prefetch=args.prefetch,
        batch=args.batch,
        loglevel=args.loglevel,
        pg_admin_url=args.pg_admin_url,
        enqueue_timeout=args.enqueue_timeout,
        drain_timeout=args.drain_timeout,
        boot_timeout=args.boot_timeout,
        keep_logs=args.keep_logs,
        bare_config=args.bare_config,
        task_events=args.task_events,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run both sides and print the table; 0 on success, 1 on a failed run."""
    opts = parse_args(argv)

    def body(broker: BenchBroker, logs: Path) -> bool:
        print(f"(a) bare Celery: {opts.jobs} jobs ...", file=sys.stderr, flush=True)
        bare = run_bare(opts, broker, logs)
        broker.empty()
        print(f"(b) Conveyor: {opts.jobs} jobs ...", file=sys.stderr, flush=True)
        conveyor = run_conveyor(opts, broker, logs)
        print(report(opts, bare, conveyor), flush=True)
        return True

    return run_guarded(
        opts.broker, prefix="conveyor-bench-", keep_logs=opts.keep_logs, kept="worker", body=body
    )


if __name__ == "__main__":
    sys.exit(main())
