"""Does a flood of `low` jobs delay `high` ones? Conveyor's pools against one bare queue.

    uv run python -m bench.priority [--backlog 50000] [--high 100]

One run, three measurements, on a dedicated Redis database number (flushed before, between
and after) and, for Conveyor, a fresh temporary PostgreSQL database (created, migrated and
dropped at the end):

(a) Conveyor, no backlog: two real worker processes, `conveyor worker --pool high` and
    `conveyor worker --pool low`, each with `--concurrency C` and the pools' own prefetch
    settings (CONVEYOR_HIGH_PREFETCH, CONVEYOR_LOW_PREFETCH: 1 and 1 by default). After a
    warm-up, H `demo.echo` jobs with priority `high` are submitted one at a time, every
    --high-interval seconds, through `conveyor.jobs.outbox.submit` with the publisher of
    `conveyor.cli.wiring.build_platform` (the path the API takes after validation: INSERT,
    commit, publish, mark published; not over HTTP). Each job's queue wait is
    `started_at - created_at` from the jobs table.
(b) Conveyor with a backlog: the same workers; N `low` jobs (`demo.sleep {seconds: S}`, or
    `demo.echo` with --low-sleep 0) are submitted first through the same outbox in batches
    of --batch (timed), then the H high jobs as in (a) while the low pool drains the
    backlog. The low queue's depth is read from Redis when the high jobs start and when
    they have all run, to show the backlog was there the whole time.
(c) bare Celery, one queue (`bench.priority_bare`): two `celery worker` processes (the same
    number of worker processes in total: 2 x C), each with `--concurrency C`, the same
    prefetch multipliers, pool class and log level, consuming the one queue `default`.
    After a warm-up, N low tasks (sleeping S seconds) are sent first, then H high tasks
    at the same pace as in (a) and (b), each carrying `time.time()` at send; the task
    records `time.time() - sent_at` first thing, in a Redis list.

All three send the high work one at a time at the same pace, so a wait measures how long
the system keeps a high job waiting, not how long a burst of high jobs queues behind
itself. Every wait has a deadline; when the bare high tasks have not all run by
--bare-timeout, the ones left count with the time they had waited so far, and the table
marks the figures as lower bounds (>=). Worker processes are killed (process group,
SIGTERM then SIGKILL) on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from bench import priority_bare
from bench.brokers import BenchBroker, check_bench_broker
from bench.databases import PG_ADMIN_URL, temporary_pg_database
from bench.harness import positive_int, run_guarded
from bench.processes import (
    POLL_SECONDS,
    BenchError,
    Worker,
    running_worker,
    wait_for,
    worker_env,
)
from conveyor.cli.wiring import Platform, build_platform, run_migrations
from conveyor.config import Settings
from conveyor.jobs import outbox, quantiles
from conveyor.jobs.models import NewJob
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

TENANT = "bench"


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    backlog: int
    high: int
    high_interval: float
    low_sleep: float
    concurrency: int
    prefetch: int | None
    pool: str
    batch: int
    loglevel: str
    broker: str
    pg_admin_url: str
    warmup: int
    boot_timeout: float
    enqueue_timeout: float
    wait_timeout: float
    bare_timeout: float
    keep_logs: bool


@dataclass(frozen=True)
class Waits:
    """The queue waits of one measurement's high jobs, in seconds."""

    name: str
    waits: list[float]
    lower_bound: bool = False  # some had not run by the deadline: their waits are so far
    note: str = ""

    @property
    def quantiles(self) -> quantiles.Quantiles:
        """Nearest-rank p50, p95, p99."""
        return quantiles.exact(self.waits)


# --------------------------------------------------------------------------- helpers


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    workers: Sequence[Worker] = (),
    progress: Callable[[], str] | None = None,
) -> bool:
    """Poll until `condition`; False at the deadline. Raises when a worker has died."""
    deadline = time.monotonic() + timeout
    while not condition():
        for worker in workers:
            worker.check_alive()
        if time.monotonic() > deadline:
            detail = f" ({progress()})" if progress else ""
            print(f"bench: {timeout:.0f}s passed waiting for {what}{detail}", file=sys.stderr)
            return False
        time.sleep(POLL_SECONDS)
    return True


def require(ok: bool, what: str, workers: Sequence[Worker] = ()) -> None:
    """Raise with the workers' last lines when a wait did not end in time."""
    if not ok:
        tails = "\n".join(f"{w.name}:\n{w.tail()}" for w in workers)
        raise BenchError(f"timed out waiting for {what}\n{tails}")


def paced(count: int, interval: float) -> Iterator[int]:
    """0..count-1, yielding i at start + i * interval (no drift from slow iterations)."""
    start = time.monotonic()
    for i in range(count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """A worker's environment: ours without any CONVEYOR_* variable, plus `extra`."""
    env = {k: v for k, v in worker_env({}).items() if not k.upper().startswith("CONVEYOR_")}
    return {**env, **extra}


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- Conveyor


class ConveyorSide:
    """A temporary database, the platform of this process, and the two pool workers."""

    def __init__(
        self, opts: Options, settings: Settings, platform: Platform, prefetch: tuple[int, int]
    ) -> None:
        self.opts = opts
        self.settings = settings
        self.prefetch = prefetch
        self.platform = platform
        self.workers: list[Worker] = []

    def scalar(self, sql: str, **params: Any) -> int:
        with self.platform.sessions() as session:
            return int(session.execute(text(sql), params).scalar_one())

    def submit(self, new_jobs: list[NewJob]) -> list[uuid.UUID]:
        jobs = outbox.submit(self.platform.sessions, self.platform.publisher, new_jobs)
        return [job.id for job in jobs]

    def new_job(self, priority: str, low: bool = False) -> NewJob:
        if low and self.opts.low_sleep > 0:
            task, payload = "demo.sleep", {"seconds": self.opts.low_sleep}
        else:
            task, payload = "demo.echo", {}
        return build_new_job(registry, tenant=TENANT, task=task, payload=payload, priority=priority)

    def succeeded(self, ids: Sequence[uuid.UUID]) -> int:
        self.check_no_failures()
        return self.scalar(
            "SELECT count(*) FROM jobs WHERE state = 'succeeded' AND id = ANY(:ids)",
            ids=list(ids),
        )

    def check_no_failures(self) -> None:
        failed = self.scalar("SELECT count(*) FROM jobs WHERE state IN ('retrying', 'dead')")
        if failed:
            raise BenchError(f"{failed} jobs failed; see the jobs table's error columns")

    def wait_all(self, ids: Sequence[uuid.UUID], timeout: float, what: str) -> None:
        ok = wait_until(
            lambda: self.succeeded(ids) >= len(ids),
            timeout=timeout,
            what=what,
            workers=self.workers,
            progress=lambda: f"{self.succeeded(ids)}/{len(ids)} succeeded",
        )
        require(ok, what, self.workers)

    def start_workers(self, stack: contextlib.ExitStack, logs: Path) -> None:
        opts = self.opts
        env = clean_env(
            {
                "CONVEYOR_DATABASE_URL": self.settings.database_url,
                "CONVEYOR_BROKER_URL": opts.broker,
                "CONVEYOR_WORKER_POOL_CLASS": opts.pool,
                "CONVEYOR_LOG_LEVEL": opts.loglevel,
                "CONVEYOR_HIGH_PREFETCH": str(self.prefetch[0]),
                "CONVEYOR_LOW_PREFETCH": str(self.prefetch[1]),
            }
        )
        for pool in ("high", "low"):
            argv = [
                sys.executable,
                "-m",
                "conveyor",
                "worker",
                "--pool",
                pool,
                "--concurrency",
                str(opts.concurrency),
            ]
            worker = stack.enter_context(running_worker(f"conveyor-{pool}", argv, env, logs))
            self.workers.append(worker)

    def warm_up(self) -> None:
        """Boot both pools and give every process of each a job or more."""
        count = max(self.opts.warmup, 1)
        ids = self.submit([self.new_job("high") for _ in range(count)])
        ids += self.submit([self.new_job("low", low=True) for _ in range(count)])
        self.wait_all(ids, self.opts.boot_timeout, "the Conveyor workers' warm-up jobs")

    def high_waits(self, name: str) -> Waits:
        """Submit the high jobs one at a time at the set pace; their queue waits."""
        ids: list[uuid.UUID] = []
        for _ in paced(self.opts.high, self.opts.high_interval):
            ids += self.submit([self.new_job("high")])
        self.wait_all(ids, self.opts.wait_timeout, f"{name}: the high jobs")
        with self.platform.sessions() as session:
            rows = session.execute(
                text("SELECT created_at, started_at FROM jobs WHERE id = ANY(:ids)"),
                {"ids": ids},
            ).all()
        waits = []
        for created_at, started_at in rows:
            assert isinstance(created_at, dt.datetime) and isinstance(started_at, dt.datetime)
            waits.append((started_at - created_at).total_seconds())
        return Waits(name, waits)

    def enqueue_backlog(self) -> float:
        """Submit the low backlog in batches; the seconds it took."""
        opts = self.opts
        deadline = time.monotonic() + opts.enqueue_timeout
        started = time.perf_counter()
        for offset in range(0, opts.backlog, opts.batch):
            size = min(opts.batch, opts.backlog - offset)
            self.submit([self.new_job("low", low=True) for _ in range(size)])
            if time.monotonic() > deadline:
                raise BenchError(
                    f"enqueueing the backlog took over {opts.enqueue_timeout:.0f}s "
                    f"({offset + size} of {opts.backlog}); try a smaller --backlog"
                )
        seconds = time.perf_counter() - started
        # The marks of publication follow the publish by a moment (conveyor.jobs.marks).
        wait_for(
            lambda: self.scalar("SELECT count(*) FROM jobs WHERE published_at IS NULL") == 0,
            timeout=10,
            what="every recorded job marked published",
        )
        return seconds


def run_conveyor(
    opts: Options, prefetch: tuple[int, int], client: redis.Redis, logs: Path
) -> tuple[Waits, Waits, float]:
    """(a) and (b): the high jobs' waits without and with the low backlog."""
    with temporary_pg_database(opts.pg_admin_url) as database_url:
        settings = Settings(
            database_url=database_url,
            broker_url=opts.broker,
            worker_pool_class=opts.pool,
            log_level=opts.loglevel,
            high_concurrency=opts.concurrency,
            low_concurrency=opts.concurrency,
        )
        run_migrations(settings)
        platform = build_platform(settings)
        side = ConveyorSide(opts, settings, platform, prefetch)
        try:
            with contextlib.ExitStack() as stack:
                side.start_workers(stack, logs)
                side.warm_up()
                print("(a) Conveyor, no backlog: high jobs ...", file=sys.stderr, flush=True)
                load_a = load()
                idle = side.high_waits("(a) Conveyor, no backlog")
                idle = Waits(idle.name, idle.waits, note=f"load {load_a:.2f}->{load():.2f}")

                print(
                    f"(b) Conveyor: enqueueing {opts.backlog} low jobs ...",
                    file=sys.stderr,
                    flush=True,
                )
                enqueue_seconds = side.enqueue_backlog()
                print(
                    f"(b) Conveyor: backlog enqueued in {enqueue_seconds:.1f}s"
                    f" ({opts.backlog / enqueue_seconds:.0f} jobs/s); high jobs ...",
                    file=sys.stderr,
                    flush=True,
                )
                low_sql = "SELECT count(*) FROM jobs WHERE queue = 'low' AND state = 'succeeded'"
                depth_start, done_start, load_b = (
                    int(client.llen("low")),
                    side.scalar(low_sql),
                    load(),
                )
                window = time.monotonic()
                busy = side.high_waits("(b) Conveyor, low backlog")
                window = time.monotonic() - window
                depth_end, done_end = int(client.llen("low")), side.scalar(low_sql)
                if depth_end == 0:
                    print(
                        "bench: warning: the low queue emptied before the high jobs had run;"
                        " use a bigger --backlog",
                        file=sys.stderr,
                    )
                busy = Waits(
                    busy.name,
                    busy.waits,
                    note=f"low queue {depth_start}->{depth_end}, "
                    f"{(done_end - done_start) / window:.0f} low/s, "
                    f"load {load_b:.2f}->{load():.2f}",
                )
        finally:
            platform.celery.close()
            platform.store.dispose()
    return idle, busy, enqueue_seconds


# --------------------------------------------------------------------------- bare Celery


def run_bare(opts: Options, prefetch: tuple[int, int], client: redis.Redis, logs: Path) -> Waits:
    """(c): one queue, the backlog first, then the high tasks at the same pace."""
    app = priority_bare.make_app(opts.broker, prefetch[0])
    try:
        with contextlib.ExitStack() as stack:
            workers: list[Worker] = []
            for i, multiplier in enumerate(prefetch, start=1):
                argv = [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench.priority_bare",
                    "worker",
                    "--queues",
                    priority_bare.QUEUE,
                    "--concurrency",
                    str(opts.concurrency),
                    "--prefetch-multiplier",
                    str(multiplier),
                    "--pool",
                    opts.pool,
                    "--hostname",
                    f"bare{i}@%h",
                    "--loglevel",
                    opts.loglevel,
                    "--without-mingle",
                    "--without-gossip",
                ]
                env = clean_env(
                    {"BENCH_BROKER_URL": opts.broker, "BENCH_PREFETCH": str(multiplier)}
                )
                workers.append(stack.enter_context(running_worker(f"bare{i}", argv, env, logs)))

            def recorded() -> int:
                return int(client.llen(priority_bare.WAITS_KEY))

            def send(task: str, args: list[Any], producer: Any) -> None:
                app.send_task(
                    task,
                    args=args,
                    queue=priority_bare.QUEUE,
                    routing_key=priority_bare.QUEUE,
                    producer=producer,
                )

            # Warm-up: both workers boot and their processes take a task or more each.
            with app.producer_or_acquire() as producer:
                for _ in range(max(opts.warmup, 1) * 2):
                    send(priority_bare.HIGH_TASK, [time.time()], producer)
            require(
                wait_until(
                    lambda: recorded() >= max(opts.warmup, 1) * 2,
                    timeout=opts.boot_timeout,
                    what="the bare workers' warm-up tasks",
                    workers=workers,
                ),
                "the bare workers' warm-up tasks",
                workers,
            )
            client.delete(priority_bare.WAITS_KEY, priority_bare.LOW_DONE_KEY)

            print(
                f"(c) bare Celery: enqueueing {opts.backlog} low tasks ...",
                file=sys.stderr,
                flush=True,
            )
            deadline = time.monotonic() + opts.enqueue_timeout
            started = time.perf_counter()
            with app.producer_or_acquire() as producer:
                for i in range(opts.backlog):
                    send(priority_bare.LOW_TASK, [opts.low_sleep], producer)
                    if i % 1000 == 0 and time.monotonic() > deadline:
                        raise BenchError(f"bare enqueue took over {opts.enqueue_timeout:.0f}s")
            enqueue_seconds = time.perf_counter() - started
            print(
                f"(c) bare Celery: backlog enqueued in {enqueue_seconds:.1f}s; high tasks ...",
                file=sys.stderr,
                flush=True,
            )
            depth_start, load_c = int(client.llen(priority_bare.QUEUE)), load()
            sent: list[float] = []
            with app.producer_or_acquire() as producer:
                for _ in paced(opts.high, opts.high_interval):
                    sent_at = time.time()
                    send(priority_bare.HIGH_TASK, [sent_at], producer)
                    sent.append(sent_at)
            finished = wait_until(
                lambda: recorded() >= opts.high,
                timeout=opts.bare_timeout,
                what="the bare high tasks (behind the whole backlog)",
                workers=workers,
                progress=lambda: (
                    f"{recorded()}/{opts.high} ran, "
                    f"{int(client.get(priority_bare.LOW_DONE_KEY) or 0)} low done"
                ),
            )
            now = time.time()
            waits = [float(w) for w in client.lrange(priority_bare.WAITS_KEY, 0, -1)]
            # FIFO: the ones that ran are the first sent; the rest count as waited so far.
            waits += [now - sent_at for sent_at in sent[len(waits) :]]
            low_done = int(client.get(priority_bare.LOW_DONE_KEY) or 0)
            note = (
                f"queue {depth_start} at start, {low_done} low done by the end, "
                f"enqueue {enqueue_seconds:.1f}s, load {load_c:.2f}->{load():.2f}"
            )
            return Waits("(c) bare Celery, 1 queue, backlog", waits, not finished, note)
    finally:
        app.close()


# --------------------------------------------------------------------------- report


def _seconds(value: float | None, lower_bound: bool) -> str:
    if value is None:
        return "n/a"
    return f"{'>=' if lower_bound else ''}{value:.3f}"


def _ratio(ours: float | None, theirs: float | None, lower_bound: bool = False) -> str:
    if ours is None or theirs is None or theirs <= 0:
        return "n/a"
    return f"{'>=' if lower_bound else ''}{ours / theirs:.2f}x"


def report(
    opts: Options, prefetch: tuple[int, int], rows: Sequence[Waits], enqueue_seconds: float
) -> str:
    """The table and the ratios."""
    low = f"demo.sleep {{seconds: {opts.low_sleep}}}" if opts.low_sleep > 0 else "demo.echo {}"
    lines = [
        f"backlog {opts.backlog} low jobs ({low}) | {opts.high} high demo.echo jobs, one every "
        f"{opts.high_interval}s | broker {opts.broker} | pool {opts.pool} | concurrency "
        f"{opts.concurrency} per worker, 2 workers per side | prefetch {prefetch[0]} (high"
        f" worker / bare 1), {prefetch[1]} (low worker / bare 2) | "
        f"loglevel {opts.loglevel} | {os.cpu_count()} CPUs",
        f"Conveyor backlog enqueue: {opts.backlog} jobs in {enqueue_seconds:.1f}s "
        f"({opts.backlog / enqueue_seconds:.0f} jobs/s, outbox.submit in batches of {opts.batch})",
        "queue wait (nearest-rank percentiles) = Conveyor: jobs.started_at - jobs.created_at; "
        "bare: time at task start - time at send",
        "",
    ]
    columns = f"{'':<38}{'n':>5}{'p50 s':>11}{'p95 s':>11}{'p99 s':>11}{'max s':>11}   notes"
    lines += [columns, "-" * len(columns)]
    for row in rows:
        q = row.quantiles
        top = max(row.waits) if row.waits else None
        lines.append(
            f"{row.name:<38}{len(row.waits):>5}{_seconds(q.p50, row.lower_bound):>11}"
            f"{_seconds(q.p95, row.lower_bound):>11}{_seconds(q.p99, row.lower_bound):>11}"
            f"{_seconds(top, row.lower_bound):>11}   {row.note}"
        )
    idle, busy, bare = rows
    lines += [
        "",
        f"Conveyor high p99, backlog / no backlog: "
        f"{_ratio(busy.quantiles.p99, idle.quantiles.p99)} (target <= 1.5x)",
        f"bare Celery 1-queue p99 / Conveyor backlog p99: "
        f"{_ratio(bare.quantiles.p99, busy.quantiles.p99, bare.lower_bound)}",
        f"bare Celery 1-queue p50 / Conveyor backlog p50: "
        f"{_ratio(bare.quantiles.p50, busy.quantiles.p50, bare.lower_bound)}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def parse_args(argv: Sequence[str] | None) -> Options:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.priority",
        description="High jobs' queue wait under a low backlog: Conveyor's pools vs one queue.",
    )
    parser.add_argument("--backlog", type=positive_int, default=50000, help="low jobs queued first")
    parser.add_argument("--high", type=positive_int, default=100, help="high jobs measured")
    parser.add_argument(
        "--high-interval", type=_non_negative, default=0.05, help="seconds between high jobs"
    )
    parser.add_argument(
        "--low-sleep",
        type=_non_negative,
        default=0.01,
        help="seconds each low job sleeps (demo.sleep); 0: demo.echo",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=2,
        help="processes per worker (2 workers a side)",
    )
    parser.add_argument(
        "--prefetch",
        type=positive_int,
        default=None,
        help="prefetch multiplier of every worker (default: Conveyor's per-pool defaults)",
    )
    parser.add_argument("--pool", choices=("prefork", "threads", "solo"), default="prefork")
    parser.add_argument("--batch", type=positive_int, default=1000, help="backlog submit batch")
    parser.add_argument("--loglevel", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    parser.add_argument(
        "--broker",
        default=priority_bare.DEFAULT_BROKER,
        help="a Redis URL with a dedicated database number, FLUSHED before, between and after",
    )
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the db")
    parser.add_argument("--warmup", type=positive_int, default=8, help="warm-up jobs per worker")
    parser.add_argument("--boot-timeout", type=float, default=90.0, help="seconds")
    parser.add_argument("--enqueue-timeout", type=float, default=300.0, help="seconds per side")
    parser.add_argument(
        "--wait-timeout", type=float, default=120.0, help="seconds for Conveyor's high jobs"
    )
    parser.add_argument(
        "--bare-timeout", type=float, default=600.0, help="seconds for the bare high tasks"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    args = parser.parse_args(argv)
    check_bench_broker(parser, args.broker, amqp=False)
    return Options(
        backlog=args.backlog,
        high=args.high,
        high_interval=args.high_interval,
        low_sleep=args.low_sleep,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        pool=args.pool,
        batch=args.batch,
        loglevel=args.loglevel,
        broker=args.broker,
        pg_admin_url=args.pg_admin_url,
        warmup=args.warmup,
        boot_timeout=args.boot_timeout,
        enqueue_timeout=args.enqueue_timeout,
        wait_timeout=args.wait_timeout,
        bare_timeout=args.bare_timeout,
        keep_logs=args.keep_logs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements and print the table; 0 on success, 1 on a failed run."""
    opts = parse_args(argv)
    overrides: dict[str, Any] = {}
    if opts.prefetch is not None:
        overrides = {"high_prefetch": opts.prefetch, "low_prefetch": opts.prefetch}
    # The pools' prefetch defaults (or --prefetch); environment and .env are not read.
    defaults = Settings.model_construct(**overrides)
    prefetch = (defaults.pool_prefetch("high"), defaults.pool_prefetch("low"))

    def body(broker: BenchBroker, logs: Path) -> bool:
        client = broker.redis
        started = time.monotonic()
        idle, busy, enqueue_seconds = run_conveyor(opts, prefetch, client, logs)
        broker.empty()
        bare = run_bare(opts, prefetch, client, logs)
        print(report(opts, prefetch, [idle, busy, bare], enqueue_seconds), flush=True)
        print(f"total run time {time.monotonic() - started:.0f}s", flush=True)
        return True

    return run_guarded(
        opts.broker,
        prefix="conveyor-bench-priority-",
        keep_logs=opts.keep_logs,
        kept="worker",
        body=body,
    )


if __name__ == "__main__":
    sys.exit(main())
