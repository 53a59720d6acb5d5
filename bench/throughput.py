"""Throughput of Conveyor's full job path against bare Celery, in one run, side by side.

    uv run python -m bench.throughput --jobs 20000

Two phases run one after the other on the same Redis broker (a dedicated database number,
flushed before, between and after) with the same worker flags: pool class, concurrency,
prefetch multiplier, log level, `--without-mingle --without-gossip`, and Conveyor's own
Celery configuration (JSON only, the `default` queue, acks_late).

(a) bare Celery (`bench.bare_app`): N no-op messages are sent with one reused producer
    (timed: enqueue), then one `celery worker` process is started and the drain is timed.
    The task records its completion in Redis (one Lua call: a counter and the earliest and
    latest completion times).
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
import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO
from urllib.parse import urlsplit

import psycopg
import redis
from sqlalchemy import text

from bench import bare_app
from conveyor.cli.wiring import Platform, build_platform, run_migrations
from conveyor.config import Settings
from conveyor.jobs import outbox
from conveyor.jobs.models import NewJob
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "default"
PG_ADMIN_URL = os.environ.get("CONVEYOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 15.0


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


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


# --------------------------------------------------------------------------- processes


class Worker:
    """A worker process in its own process group, its output in a log file."""

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
            raise BenchError(f"{self.name} worker exited with {code}\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        """The last lines of the worker's output."""
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
    """Start a worker; it is stopped when the block ends, however it ends."""
    worker = Worker(name, argv, env, logs / f"{name}.log")
    try:
        yield worker
    finally:
        worker.stop()


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- helpers


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    worker: Worker | None = None,
    progress: Callable[[], str] | None = None,
) -> None:
    """Poll `condition` every POLL_SECONDS until true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            detail = f" ({progress()})" if progress else ""
            tail = f"\n{worker.tail()}" if worker else ""
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{tail}")
        time.sleep(POLL_SECONDS)


def flush_broker(client: redis.Redis) -> None:
    """Empty the benchmark's Redis database: messages, bindings, unacked, counters."""
    client.flushdb()


def check_queue_length(client: redis.Redis, expected: int) -> None:
    """Fail unless the queue holds exactly the messages just sent."""
    length = int(client.llen(QUEUE))
    if length != expected:
        raise BenchError(f"queue {QUEUE!r} holds {length} messages after enqueue, not {expected}")


def worker_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a worker process: ours, with the project importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def temporary_pg_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration; yields its SQLAlchemy URL."""
    name = f"conveyor_bench_{uuid.uuid4().hex[:12]}"
    admin = urlsplit(admin_url)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin._replace(scheme="postgresql+psycopg", path=f"/{name}").geturl()
    finally:
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as error:
            print(f"bench: could not drop database {name}: {error}", file=sys.stderr)


# --------------------------------------------------------------------------- (a) bare Celery


def send_bare_jobs(opts: Options) -> float:
    """Send N no-op messages to the queue with one reused producer; the seconds it took."""
    app = bare_app.make_app(opts.broker, opts.prefetch)
    try:
        deadline = time.monotonic() + opts.enqueue_timeout
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(opts.jobs):
                app.send_task(
                    bare_app.NOOP_TASK,
                    args=[str(uuid.uuid4())],
                    queue=QUEUE,
                    routing_key=QUEUE,
                    producer=producer,
                )
                if i % 1000 == 0 and time.monotonic() > deadline:
                    raise BenchError(f"bare enqueue took over {opts.enqueue_timeout:.0f}s")
        return time.perf_counter() - started
    finally:
        app.close()


def bare_worker_argv(opts: Options) -> list[str]:
    """The command line of the bare Celery worker."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.bare_app",
        "worker",
        "--queues",
        QUEUE,
        "--concurrency",
        str(opts.concurrency),
        "--pool",
        opts.pool,
        "--hostname",
        "bare@%h",
        "--loglevel",
        opts.loglevel,
        "--without-mingle",
        "--without-gossip",
    ]


def bare_worker_env(opts: Options) -> dict[str, str]:
    """The environment of the bare Celery worker."""
    return worker_env({"BENCH_BROKER_URL": opts.broker, "BENCH_PREFETCH": str(opts.prefetch)})


def run_bare(opts: Options, client: redis.Redis, logs: Path) -> Result:
    """Enqueue N no-op messages with one producer, then drain them with one worker process."""
    enqueue_seconds = send_bare_jobs(opts)
    check_queue_length(client, opts.jobs)
    argv = bare_worker_argv(opts)
    env = bare_worker_env(opts)

    def done() -> int:
        return int(client.get(bare_app.DONE_KEY) or 0)

    with running_worker("bare", argv, env, logs) as worker:
        wait_for(
            lambda: done() >= 1,
            timeout=opts.boot_timeout,
            what="the bare worker's first completion",
            worker=worker,
        )
        load_start = os.getloadavg()[0]
        wait_for(
            lambda: done() >= opts.jobs,
            timeout=opts.drain_timeout,
            what="the bare drain",
            worker=worker,
            progress=lambda: f"{done()}/{opts.jobs} done",
        )
        load_end = os.getloadavg()[0]
        first = float(client.get(bare_app.FIRST_KEY) or 0)
        last = float(client.get(bare_app.LAST_KEY) or 0)
        count = done()
    if count != opts.jobs:
        raise BenchError(f"bare Celery ran {count} tasks for {opts.jobs} messages")
    return Result(
        "bare Celery",
        opts.jobs,
        enqueue_seconds,
        boot_seconds=first - worker.started_at,
        drain_seconds=last - first,
        wall_seconds=last - worker.started_at,
        load=(load_start, load_end),
    )


# --------------------------------------------------------------------------- (b) Conveyor


def run_conveyor(opts: Options, logs: Path) -> Result:
    """Record and publish N demo.echo jobs, then drain them with one `conveyor worker`."""
    with temporary_pg_database(opts.pg_admin_url) as database_url:
        settings = conveyor_settings(opts, database_url)
        run_migrations(settings)
        platform = build_platform(settings)
        try:
            return _conveyor_phase(opts, settings, platform, logs)
        finally:
            platform.celery.close()
            platform.store.dispose()


def conveyor_settings(opts: Options, database_url: str) -> Settings:
    """The settings of the Conveyor side, on `database_url`."""
    return Settings(
        database_url=database_url,
        broker_url=opts.broker,
        prefetch_multiplier=opts.prefetch,
        worker_pool_class=opts.pool,
        log_level=opts.loglevel,
    )


def submit_conveyor_jobs(opts: Options, platform: Platform) -> float:
    """Record and publish N demo.echo jobs through the outbox; the seconds it took.

    Raises unless every job was published.
    """
    sessions = platform.sessions
    deadline = time.monotonic() + opts.enqueue_timeout
    started = time.perf_counter()
    for offset in range(0, opts.jobs, opts.batch):
        size = min(opts.batch, opts.jobs - offset)
        batch: list[NewJob] = [
            build_new_job(registry, tenant="bench", task="demo.echo", payload={})
            for _ in range(size)
        ]
        outbox.submit(sessions, platform.publisher, batch)
        if time.monotonic() > deadline:
            raise BenchError(f"Conveyor enqueue took over {opts.enqueue_timeout:.0f}s")
    enqueue_seconds = time.perf_counter() - started
    with sessions() as session:
        unpublished = int(
            session.execute(
                text("SELECT count(*) FROM jobs WHERE published_at IS NULL")
            ).scalar_one()
        )
    if unpublished:
        raise BenchError(f"{unpublished} jobs were recorded but not published (see warnings)")
    return enqueue_seconds


def conveyor_worker_argv(opts: Options) -> list[str]:
    """The command line of the Conveyor worker: `conveyor worker --pool default`."""
    return [
        sys.executable,
        "-m",
        "conveyor",
        "worker",
        "--pool",
        QUEUE,
        "--concurrency",
        str(opts.concurrency),
    ]


def conveyor_worker_env(opts: Options, settings: Settings) -> dict[str, str]:
    """The environment of the Conveyor worker: the same broker, prefetch, pool and level."""
    return worker_env(
        {
            "CONVEYOR_DATABASE_URL": settings.database_url,
            "CONVEYOR_BROKER_URL": opts.broker,
            "CONVEYOR_PREFETCH_MULTIPLIER": str(opts.prefetch),
            "CONVEYOR_WORKER_POOL_CLASS": opts.pool,
            "CONVEYOR_LOG_LEVEL": opts.loglevel,
        }
    )


def _conveyor_phase(opts: Options, settings: Settings, platform: Platform, logs: Path) -> Result:
    sessions = platform.sessions
    enqueue_seconds = submit_conveyor_jobs(opts, platform)

    def scalar(sql: str) -> int:
        with sessions() as session:
            return int(session.execute(text(sql)).scalar_one())

    client = redis.Redis.from_url(opts.broker, socket_timeout=10)
    try:
        check_queue_length(client, opts.jobs)
    finally:
        client.close()

    argv = conveyor_worker_argv(opts)
    env = conveyor_worker_env(opts, settings)
    succeeded_sql = "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
    failed_sql = "SELECT count(*) FROM jobs WHERE state IN ('retrying', 'dead', 'cancelled')"

    def succeeded() -> int:
        return scalar(succeeded_sql)

    def finished_all() -> bool:
        if scalar(failed_sql):
            raise BenchError("some demo.echo jobs failed; see the jobs table's error columns")
        return succeeded() >= opts.jobs

    with running_worker("conveyor", argv, env, logs) as worker:
        wait_for(
            lambda: succeeded() >= 1,
            timeout=opts.boot_timeout,
            what="the Conveyor worker's first completion",
            worker=worker,
        )
        load_start = os.getloadavg()[0]
        wait_for(
            finished_all,
            timeout=opts.drain_timeout,
            what="the Conveyor drain",
            worker=worker,
            progress=lambda: f"{succeeded()}/{opts.jobs} succeeded",
        )
        load_end = os.getloadavg()[0]
    with sessions() as session:
        row = session.execute(
            text(
                "SELECT count(*), min(finished_at), max(finished_at) FROM jobs"
                " WHERE state = 'succeeded'"
            )
        ).one()
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
        load=(load_start, load_end),
    )


# --------------------------------------------------------------------------- report


def report(opts: Options, bare: Result, conveyor: Result) -> str:
    """The side-by-side table."""
    header = (
        f"{opts.jobs} jobs | broker {opts.broker} | pool {opts.pool} | "
        f"concurrency {opts.concurrency} | prefetch {opts.prefetch} | loglevel {opts.loglevel} | "
        f"Conveyor batch {opts.batch}"
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


def positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


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
        help="a Redis URL with a dedicated database number, FLUSHED before, between and after",
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
    args = parser.parse_args(argv)
    url = urlsplit(args.broker)
    if url.scheme not in ("redis", "rediss") or url.path.strip("/") in ("", "0"):
        parser.error(
            "--broker must be a redis:// URL naming a database other than 0 (it is flushed)"
        )
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
    )


def run_guarded(
    broker: str,
    *,
    prefix: str,
    keep_logs: bool,
    kept: str,
    body: Callable[[redis.Redis, Path], bool],
) -> int:
    """Run a benchmark body with its broker db flushed before and after, and its logs in a
    temporary folder kept on failure; every failure is one line. 0 on success, else 1."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    logs = Path(tempfile.mkdtemp(prefix=prefix))
    client = redis.Redis.from_url(broker, socket_timeout=10, socket_connect_timeout=5)
    ok = False
    try:
        flush_broker(client)
        ok = body(client, logs)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
    except Exception as error:  # a service failed under us: one line, not a traceback
        print(f"bench: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
    finally:
        with contextlib.suppress(redis.RedisError):
            flush_broker(client)
        client.close()
        if ok and not keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"bench: {kept} logs kept in {logs}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run both sides and print the table; 0 on success, 1 on a failed run."""
    opts = parse_args(argv)

    def body(client: redis.Redis, logs: Path) -> bool:
        print(f"(a) bare Celery: {opts.jobs} jobs ...", file=sys.stderr, flush=True)
        bare = run_bare(opts, client, logs)
        flush_broker(client)
        print(f"(b) Conveyor: {opts.jobs} jobs ...", file=sys.stderr, flush=True)
        conveyor = run_conveyor(opts, logs)
        print(report(opts, bare, conveyor), flush=True)
        return True

    return run_guarded(
        opts.broker, prefix="conveyor-bench-", keep_logs=opts.keep_logs, kept="worker", body=body
    )


if __name__ == "__main__":
    sys.exit(main())
