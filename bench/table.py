"""The hot paths' goals in one table: each Conveyor figure beside its baseline, in one run.

    uv run python -m bench.table [--broker redis|amqp|both] [--quick] [--jobs 5000]

Every row runs both sides one after the other on the same broker, with the same worker
flags, and prints Conveyor's figure, the baseline's, their ratio, the goal and whether it
is met. Queues are emptied before and after every row (Redis: FLUSHDB of a dedicated
database number; RabbitMQ: the known queues purged on the given virtual host), every wait
is a condition with a deadline, and every process is stopped (its process group, SIGTERM
then SIGKILL) on success, error and Ctrl-C.

Rows, Redis (all) and RabbitMQ (all but the first):

- single `POST /v1/jobs`: Conveyor's API and `bench.bare_api` (the same request model,
  parse only), one uvicorn process each (`bench.api_servers`), each loaded by `wrk -t1
  -c16` for --warmup seconds and then --duration seconds with the same body
  {"task": "demo.echo", "payload": {"n": 1}} on 16 keep-alive connections: requests/s
  and p50/p99 latency of the timed run. Only 202 answers count. Afterwards the jobs table
  must hold every job Conveyor accepted (warm-up included) and at most one more per
  connection and run (requests cut off when wrk stops), and the broker a message for each
  published job. Without `wrk` on PATH, the Python client of `bench.submit` sends a fixed
  number of requests sized from a probe to last about --duration.
- `POST /v1/jobs/batch`: --batches requests of 1,000 jobs sent one after the other on one
  keep-alive connection (after one warm-up batch), against bare Celery `apply_async` of
  the same number of no-op messages on one reused producer (`bench.throughput.enqueue_bare`
  after 100 warm-up messages), Celery's default configuration. jobs/s; the jobs table and
  the queue must hold them all.
- drain: --jobs queued no-op jobs drained by one `conveyor worker --pool default` against
  bare Celery prefork `-c 2` with Celery's defaults (`--bare-config celery` of
  `bench.throughput`): both get `--concurrency 2 --prefetch-multiplier 4 --pool prefork
  --loglevel INFO --without-mingle --without-gossip`; (N - 1) / (last - first completion).
- idle enqueue-to-start, p50 and p99: right after its drain, with the same worker now
  idle, --samples jobs one at a time, each sent once the previous one has started (and,
  for Conveyor, finished); 5 more first as a warm-up. The time runs from `time.time()`
  just before the submission in this process (Conveyor: `outbox.submit`, the INSERT
  transaction, the publish and the mark, as the API does after parsing; bare:
  `apply_async`) to the start: Conveyor's `jobs.started_at` (the database's clock at the
  claim, just before the handler runs), bare Celery's `time.time()` recorded first thing
  by the task. One host, one clock.
- worker memory: RSS summed over the drain worker's process group (the main process and
  its pool children) right after the drain; PSS is shown beside it, since RSS counts the
  pages a prefork parent shares with its children once per process.

The 1-minute load average is printed per row (start -> end) and for the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import text

from bench import bare_app, submit, throughput
from bench.api_servers import ApiDatabase, Target, api_database, api_servers
from bench.brokers import AMQP_URL, BARE_QUEUE, BenchBroker, check_bench_broker
from bench.databases import PG_ADMIN_URL
from bench.harness import positive_int, run_guarded
from bench.processes import ROOT, BenchError, Worker, wait_for
from conveyor.cli.wiring import Platform
from conveyor.config import POOLS
from conveyor.jobs import outbox
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

REDIS_URL = "redis://127.0.0.1:6379/12"
WRK_SCRIPT = ROOT / "bench" / "wrk_post.lua"
BATCH_SIZE = 1000
IDLE_WARMUP = 5
IDLE_POLL_SECONDS = 0.005
SINGLE_BODY = json.dumps(submit.job_body(1), separators=(",", ":")).encode()


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    brokers: tuple[str, ...]  # "redis", "amqp"
    redis_url: str
    amqp_url: str
    quick: bool
    duration: float
    warmup: float
    connections: int
    batches: int
    jobs: int
    samples: int
    pg_admin_url: str
    boot_timeout: float
    keep_logs: bool
    # What the HTTP client of bench.submit reads.
    clients: int = 1
    client: str = "raw"
    request_timeout: float = 120.0
    phase_timeout: float = 900.0

    def url(self, broker: str) -> str:
        """The URL of a broker kind."""
        return self.amqp_url if broker == "amqp" else self.redis_url


@dataclass(frozen=True)
class Goal:
    """A row's goal: on the ratio Conveyor / baseline, or on Conveyor's figure itself."""

    text: str
    check: Callable[[float, float], bool]  # (Conveyor, ratio) -> met


def ratio_at_least(bound: float) -> Goal:
    """Conveyor / baseline >= bound."""
    return Goal(f">= {bound:g}x", lambda _ours, ratio: ratio >= bound)


def ratio_at_most(bound: float) -> Goal:
    """Conveyor / baseline <= bound."""
    return Goal(f"<= {bound:g}x", lambda _ours, ratio: ratio <= bound)


def value_at_most(bound: float, unit: str) -> Goal:
    """Conveyor's figure <= bound."""
    return Goal(f"<= {bound:g} {unit}", lambda ours, _ratio: ours <= bound)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    path: str
    broker: str
    unit: str
    conveyor: float
    baseline: float
    goal: Goal
    load: tuple[float, float]
    notes: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        """Conveyor / baseline."""
        return self.conveyor / self.baseline if self.baseline > 0 else math.nan

    @property
    def met(self) -> bool:
        """Whether the goal is met."""
        return self.goal.check(self.conveyor, self.ratio)


@dataclass
class Rows:
    """The rows measured so far, each with the load average around it."""

    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        """Keep a row and say it on stderr."""
        self.rows.append(row)
        print(
            f"  {row.path} [{row.broker}]: Conveyor {row.conveyor:.1f}, "
            f"baseline {row.baseline:.1f} {row.unit}",
            file=sys.stderr,
            flush=True,
        )


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- single POST


@dataclass(frozen=True)
class Load:
    """What one fixed-duration run of a load generator measured."""

    accepted: int
    refused: int
    socket_errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        """Accepted requests per second."""
        return self.accepted / self.seconds if self.seconds > 0 else math.nan


def wrk_load(target: Target, seconds: float, connections: int) -> Load:
    """`wrk -t1 -c<connections> -d<seconds>` POSTing the single body to `target`."""
    env = {
        **os.environ,
        "BENCH_BODY": SINGLE_BODY.decode(),
        "BENCH_AUTH": target.headers.get("Authorization", ""),
    }
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        f"{target.base}/v1/jobs",
    ]
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk against {target.side} did not end in time") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}{done.stdout}")
    figures = json.loads(lines[-1])
    target.process.check_alive()
    errors = sum(figures[k] for k in ("connect", "read", "write", "timeout"))
    return Load(
        accepted=figures["accepted"],
        refused=figures["refused"],
        socket_errors=errors,
        seconds=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
    )


def python_load(target: Target, seconds: float, connections: int, opts: Options) -> Load:
    """The fallback without wrk: bench.submit's client, a request count sized to `seconds`."""
    client_opts = _client_options(opts, connections)
    probe, probe_seconds = submit.send(target, submit.single_calls(20 * connections), client_opts)
    rate = probe.accepted_requests / probe_seconds if probe_seconds > 0 else 100.0
    calls = submit.single_calls(max(connections, round(rate * seconds)))
    tally, elapsed = submit.send(target, calls, client_opts)
    latencies = sorted(tally.latencies)

    def quantile(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, math.ceil(q * len(latencies)) - 1)]

    return Load(
        accepted=tally.accepted_requests + probe.accepted_requests,
        refused=len(calls)
        + len(probe.latencies)
        - tally.accepted_requests
        - probe.accepted_requests,
        socket_errors=0,
        seconds=elapsed,
        p50_ms=quantile(0.5),
        p99_ms=quantile(0.99),
    )


def _client_options(opts: Options, clients: int) -> Options:
    return replace(opts, clients=clients)


def load_target(target: Target, seconds: float, opts: Options) -> Load:
    """Load `target` with single POSTs for about `seconds`; every answer must be 202."""
    if shutil.which("wrk"):
        result = wrk_load(target, seconds, opts.connections)
    else:
        result = python_load(target, seconds, opts.connections, opts)
    if result.refused or result.socket_errors:
        raise BenchError(
            f"{target.side}: {result.refused} answers other than 202 and "
            f"{result.socket_errors} socket errors under load"
        )
    return result


def single_row(
    conveyor: Target, bare: Target, database: ApiDatabase, broker: BenchBroker, opts: Options
) -> Row:
    """Single POST /v1/jobs: requests/s of Conveyor's API and of the bare endpoint."""
    start = load1()
    before, _ = database.job_counts()
    accepted = 0
    loads: dict[str, Load] = {}
    for target in (conveyor, bare):
        warm = load_target(target, opts.warmup, opts)
        loads[target.side] = load_target(target, opts.duration, opts)
        if target is conveyor:
            accepted = warm.accepted + loads[target.side].accepted
    cut_off = 2 * opts.connections  # requests in flight when wrk stopped, per run
    recorded = _settled_count(database, before + accepted) - before
    total, unpublished = database.job_counts()
    messages = broker.depth(POOLS)
    if not 0 <= recorded - accepted <= cut_off:
        raise BenchError(f"Conveyor recorded {recorded} jobs for {accepted} accepted requests")
    if messages != total - unpublished:
        raise BenchError(f"the broker holds {messages} messages for {total - unpublished} jobs")
    ours, theirs = loads[conveyor.side], loads[bare.side]
    return Row(
        "single POST /v1/jobs",
        broker.kind,
        "req/s",
        ours.rate,
        theirs.rate,
        ratio_at_least(0.4),
        (start, load1()),
        (
            f"{opts.connections} keep-alive connections, {opts.duration:g} s after "
            f"{opts.warmup:g} s warm-up, {'wrk' if shutil.which('wrk') else 'Python client'}; "
            f"p50/p99 ms Conveyor {ours.p50_ms:.1f}/{ours.p99_ms:.1f}, "
            f"bare {theirs.p50_ms:.1f}/{theirs.p99_ms:.1f}",
            f"verified: {recorded} jobs recorded for {accepted} accepted (cut off at the "
            f"end: {recorded - accepted}); {messages} messages for {total - unpublished} "
            "published",
        ),
    )


def _settled_count(database: ApiDatabase, expected: int) -> int:
    """The number of jobs once at least `expected` are there and it has stopped growing."""
    seen: list[int] = []

    def settled() -> bool:
        seen.append(database.job_counts()[0])
        return seen[-1] >= expected and len(seen) >= 3 and seen[-1] == seen[-3]

    wait_for(settled, timeout=30, what=f"{expected} jobs in the table", interval=0.2)
    return seen[-1]


# --------------------------------------------------------------------------- batch


def batch_row(conveyor: Target, database: ApiDatabase, broker: BenchBroker, opts: Options) -> Row:
    """POST /v1/jobs/batch of 1,000 jobs, one after another, against an apply_async loop."""
    start = load1()
    jobs = opts.batches * BATCH_SIZE
    client_opts = _client_options(opts, 1)
    before, unpublished_before = database.job_counts()
    warm, _ = submit.send(conveyor, submit.batch_calls(BATCH_SIZE, BATCH_SIZE), client_opts)
    tally, seconds = submit.send(
        conveyor, submit.batch_calls(jobs, BATCH_SIZE, start=BATCH_SIZE), client_opts
    )
    sent = warm.accepted_jobs + tally.accepted_jobs
    if tally.accepted_jobs != jobs or warm.accepted_jobs != BATCH_SIZE:
        raise BenchError(f"Conveyor batch: {dict(tally.statuses)} {tally.first_error}")
    # The marks of publication follow the answers by up to the group commit's mark delay.
    counts: list[tuple[int, int, int]] = []

    def marked() -> bool:
        total, unpublished = database.job_counts()
        # The queues were emptied before this row: they hold what this row published.
        published = (total - unpublished) - (before - unpublished_before)
        counts.append((total, published, broker.depth(POOLS)))
        return published == counts[-1][2]

    with contextlib.suppress(BenchError):
        wait_for(marked, timeout=10, what="the batch row's marks of publication", interval=0.05)
    total, published, messages = counts[-1]
    if total - before != sent or messages != published:
        raise BenchError(
            f"Conveyor batch: {total - before} jobs recorded for {sent} accepted, "
            f"{messages} messages for {published} published"
        )
    ours = jobs / seconds
    broker.empty()

    app = bare_app.make_app(broker.url, 4, config="celery")
    try:
        throughput.enqueue_bare(app, 100, opts.phase_timeout)
        bare_seconds = throughput.enqueue_bare(app, jobs, opts.phase_timeout)
    finally:
        app.close()
    queued = broker.depth(BARE_QUEUE)
    if queued != jobs + 100:
        raise BenchError(f"bare Celery: {queued} messages queued for {jobs + 100} sent")
    broker.empty()
    return Row(
        f"POST /v1/jobs/batch {opts.batches}x{BATCH_SIZE}",
        broker.kind,
        "jobs/s",
        ours,
        jobs / bare_seconds,
        ratio_at_least(3.0),
        (start, load1()),
        (
            f"Conveyor: {opts.batches} requests in {seconds:.2f} s on one connection, request "
            f"p50 {statistics.median(tally.latencies) * 1000:.0f} ms; bare: {jobs} apply_async "
            f"in {bare_seconds:.2f} s (Celery defaults"
            + (", no publisher confirms; Conveyor waits for them)" if broker.is_amqp else ")"),
            f"verified: {total - before} jobs recorded for {sent} accepted (warm-up "
            f"included), {messages} messages for {published} published; bare {queued} "
            "messages queued",
        ),
    )


# --------------------------------------------------------------------------- drain and idle


def _quantile_ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# A probe of one idle sample: its figures in seconds once it has started, else None.
Probe = Callable[[], tuple[float, ...] | None]


def time_samples(
    worker: Worker, side: str, samples: int, send: Callable[[int], Probe]
) -> list[tuple[float, ...]]:
    """Send samples one at a time, each once the previous one's probe answers; the answers
    of all but the IDLE_WARMUP first."""
    answers: list[tuple[float, ...]] = []
    for i in range(IDLE_WARMUP + samples):
        probe = send(i)
        seen: list[tuple[float, ...]] = []

        def answered(probe: Probe = probe, seen: list[tuple[float, ...]] = seen) -> bool:
            value = probe()
            if value is not None:
                seen.append(value)
            return value is not None

        wait_for(
            answered,
            timeout=30,
            what=f"{side} sample {i} to start",
            worker=worker,
            interval=IDLE_POLL_SECONDS,
        )
        if i >= IDLE_WARMUP:
            answers.append(seen[0])
    return answers


def bare_idle(samples: int, waits: list[float]) -> throughput.BareHook:
    """A hook timing `samples` enqueue-to-start waits on the drained (idle) bare worker."""

    def hook(worker: Worker, app: Celery, client: redis.Redis) -> None:
        task = app.tasks[bare_app.STARTED_TASK]
        client.delete(bare_app.STARTS_KEY)
        with app.producer_or_acquire() as producer:

            def send(i: int) -> Probe:
                sent = time.time()
                task.apply_async(args=[i], producer=producer)

                def probe() -> tuple[float, ...] | None:
                    started = client.lindex(bare_app.STARTS_KEY, i)
                    return None if started is None else (float(started) - sent,)

                return probe

            waits.extend(answer[0] for answer in time_samples(worker, "bare", samples, send))
        client.delete(bare_app.STARTS_KEY)

    return hook


def conveyor_idle(samples: int, waits: list[float], queued: list[float]) -> throughput.ConveyorHook:
    """A hook timing `samples` enqueue-to-start waits on the drained (idle) Conveyor worker,
    each once the previous one has finished; `queued` gets `started_at - created_at`."""
    query = text(
        "SELECT finished_at IS NOT NULL, extract(epoch FROM created_at),"
        " extract(epoch FROM started_at) FROM jobs WHERE id = :id"
    )

    def hook(worker: Worker, platform: Platform) -> None:
        def send(i: int) -> Probe:
            new = build_new_job(registry, tenant="bench", task="demo.echo", payload={"n": i})
            sent = time.time()
            outbox.submit(platform.sessions, platform.publisher, [new])

            def probe() -> tuple[float, ...] | None:
                with platform.sessions() as session:
                    done, created, started = session.execute(query, {"id": new.id}).one()
                return (float(started) - sent, float(started - created)) if done else None

            return probe

        for wait, queue_wait in time_samples(worker, "Conveyor", samples, send):
            waits.append(wait)
            queued.append(queue_wait)

    return hook


def worker_rows(broker: BenchBroker, opts: Options, logs: Path) -> list[Row]:
    """Drain, idle enqueue-to-start and worker memory, from one worker per side."""
    topts = throughput.Options(
        jobs=opts.jobs,
        broker=broker.url,
        concurrency=2,
        pool="prefork",
        prefetch=4,
        batch=BATCH_SIZE,
        loglevel="INFO",
        pg_admin_url=opts.pg_admin_url,
        enqueue_timeout=opts.phase_timeout,
        drain_timeout=opts.phase_timeout,
        boot_timeout=opts.boot_timeout,
        keep_logs=opts.keep_logs,
        bare_config="celery",
    )
    start = load1()
    bare_waits: list[float] = []
    print(f"  drain [{broker.kind}]: bare Celery, {opts.jobs} jobs ...", file=sys.stderr)
    bare = throughput.run_bare(topts, broker, logs, bare_idle(opts.samples, bare_waits))
    broker.empty()
    waits: list[float] = []
    queued: list[float] = []
    print(f"  drain [{broker.kind}]: Conveyor, {opts.jobs} jobs ...", file=sys.stderr)
    ours = throughput.run_conveyor(topts, broker, logs, conveyor_idle(opts.samples, waits, queued))
    broker.empty()
    end = load1()
    kind = broker.kind
    flags = "prefork -c 2, prefetch 4, INFO, no mingle/gossip"
    rows = [
        Row(
            "drain, one worker",
            kind,
            "jobs/s",
            ours.drain_rate,
            bare.drain_rate,
            ratio_at_least(1.0),
            (start, end),
            (
                f"{opts.jobs} no-op jobs, {flags}; boot s Conveyor {ours.boot_seconds:.2f}, "
                f"bare {bare.boot_seconds:.2f}; drain load 1m Conveyor {_span(ours.load)}, "
                f"bare {_span(bare.load)}",
            ),
        )
    ]
    idle_note = (
        f"{opts.samples} samples after {IDLE_WARMUP} warm-up, one at a time, idle worker; "
        f"Conveyor started_at - created_at p50/p99 {_quantile_ms(queued, 0.5):.1f}/"
        f"{_quantile_ms(queued, 0.99):.1f} ms"
    )
    for q, bound in ((0.5, 5.0), (0.99, 20.0)):
        rows.append(
            Row(
                f"idle enqueue-to-start p{round(q * 100)}",
                kind,
                "ms",
                _quantile_ms(waits, q),
                _quantile_ms(bare_waits, q),
                value_at_most(bound, "ms"),
                (start, end),
                (idle_note,) if q == 0.5 else (),
            )
        )
    if ours.memory is not None and bare.memory is not None:
        rows.append(
            Row(
                "worker RSS, main + children",
                kind,
                "MB",
                ours.memory[0],
                bare.memory[0],
                ratio_at_most(1.2),
                (start, end),
                (
                    f"after the drain; processes Conveyor {ours.memory[2]}, bare "
                    f"{bare.memory[2]}; PSS MB Conveyor {ours.memory[1]:.1f}, "
                    f"bare {bare.memory[1]:.1f}",
                ),
            )
        )
    return rows


# --------------------------------------------------------------------------- the run


def run_broker(kind: str, opts: Options, rows: Rows) -> int:
    """Every row on one broker; 0 when all ran."""

    def body(broker: BenchBroker, logs: Path) -> bool:
        with (
            api_database(opts.pg_admin_url, broker.url) as database,
            api_servers(database, logs, opts.boot_timeout) as (conveyor, bare),
        ):
            if kind == "redis":
                print(f"  single POST [{kind}] ...", file=sys.stderr, flush=True)
                rows.add(single_row(conveyor, bare, database, broker, opts))
                broker.empty()
            print(f"  batch [{kind}] ...", file=sys.stderr, flush=True)
            rows.add(batch_row(conveyor, database, broker, opts))
        for row in worker_rows(broker, opts, logs):
            rows.add(row)
        return True

    print(f"broker {kind}: {opts.url(kind)}", file=sys.stderr, flush=True)
    return run_guarded(
        opts.url(kind),
        prefix=f"conveyor-bench-table-{kind}-",
        keep_logs=opts.keep_logs,
        kept="process",
        body=body,
    )


def report(opts: Options, rows: Sequence[Row], loads: tuple[str, str]) -> str:
    """The table, its notes and the load average."""
    header = (
        f"bench.table{' --quick' if opts.quick else ''} | {os.cpu_count()} CPUs | "
        f"load average at start {loads[0]}, at end {loads[1]}"
    )
    columns = ("path", "broker", "unit", "Conveyor", "baseline", "ratio", "goal", "met", "load 1m")
    cells = [
        (
            row.path,
            row.broker,
            row.unit,
            f"{row.conveyor:,.1f}",
            f"{row.baseline:,.1f}",
            f"{row.ratio:.3f}x",
            row.goal.text,
            "yes" if row.met else "NO",
            _span(row.load),
        )
        for row in rows
    ]
    widths = [max(len(c[i]) for c in [columns, *cells]) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.ljust(w) if i < 3 or i == 6 else v.rjust(w)
                for i, (v, w) in enumerate(zip(values, widths, strict=True))
            )
            + " |"
        )

    out = [header, "", line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    met = sum(row.met for row in rows)
    out += ["", f"goals met: {met} of {len(rows)}", ""]
    for number, row in enumerate(rows, 1):
        for note in row.notes:
            out.append(f"[{number}] {row.path} [{row.broker}]: {note}")
    return "\n".join(out)


def _span(load: tuple[float, float]) -> str:
    return f"{load[0]:.2f}->{load[1]:.2f}"


def _loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def parse_args(argv: Sequence[str] | None) -> Options:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.table",
        description="Conveyor's hot paths against their baselines, one table.",
    )
    parser.add_argument("--broker", choices=("redis", "amqp", "both"), default="redis")
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer jobs")
    parser.add_argument("--jobs", type=positive_int, help="drain jobs per side (5000; quick 1000)")
    parser.add_argument("--samples", type=positive_int, help="idle samples (200; quick 50)")
    parser.add_argument("--duration", type=float, help="single POST seconds (10; quick 3)")
    parser.add_argument("--warmup", type=float, help="single POST warm-up seconds (2; quick 1)")
    parser.add_argument("--batches", type=positive_int, help="batches of 1000 (10; quick 3)")
    parser.add_argument("--connections", type=positive_int, default=16, help="single POST")
    parser.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help="a Redis URL with a dedicated database number, FLUSHED before, between and after",
    )
    parser.add_argument(
        "--amqp-url", default=AMQP_URL, help="RabbitMQ; Conveyor's and bare queues are PURGED"
    )
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the dbs")
    parser.add_argument("--boot-timeout", type=float, default=60.0, help="seconds per process")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs")
    args = parser.parse_args(argv)
    check_bench_broker(parser, args.redis_url, amqp=False)
    check_bench_broker(parser, args.amqp_url, amqp=True)
    quick = args.quick

    def pick(value: float | None, full: float, short: float) -> float:
        return value if value is not None else (short if quick else full)

    return Options(
        brokers=("redis", "amqp") if args.broker == "both" else (args.broker,),
        redis_url=args.redis_url,
        amqp_url=args.amqp_url,
        quick=quick,
        duration=pick(args.duration, 10, 3),
        warmup=pick(args.warmup, 2, 1),
        connections=args.connections,
        batches=int(pick(args.batches, 10, 3)),
        jobs=int(pick(args.jobs, 5000, 1000)),
        samples=int(pick(args.samples, 200, 50)),
        pg_admin_url=args.pg_admin_url,
        boot_timeout=args.boot_timeout,
        keep_logs=args.keep_logs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run every row on the chosen brokers and print the table; 0 when every row ran."""
    opts = parse_args(argv)
    started, load_start = time.monotonic(), _loadavg()
    rows = Rows()
    failed = sum(run_broker(kind, opts, rows) for kind in opts.brokers)
    if rows.rows:
        print(report(opts, rows.rows, (load_start, _loadavg())), flush=True)
    print(f"total run time {time.monotonic() - started:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
