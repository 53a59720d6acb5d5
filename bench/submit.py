"""Submission throughput of Conveyor's HTTP API against a bare FastAPI app, in one run.

    uv run python -m bench.submit --requests 2000 --batch-size 500 --clients 8

Two servers run side by side, each one uvicorn process started the same way
(`uvicorn.run(app, host, port, log_level, access_log=False)`, same uvicorn, same loop and
HTTP implementation) in its own process group, its output in a log file:

(a, b) Conveyor: `python -m conveyor api` on a fresh temporary PostgreSQL database (created,
    migrated, dropped at the end), CONVEYOR_BROKER_URL on a dedicated Redis database number
    (flushed before and after; nothing consumes it), the per-key rate limit off
    (CONVEYOR_API_RATE_PER_SECOND=0), CONVEYOR_LOG_LEVEL=WARNING, and an API key with every
    scope created with `conveyor.jobs.keys.create_key` in that database.
(c) bare: `python -m bench.bare_api`, FastAPI parsing the same bodies into models equivalent
    to JobIn and BatchIn and answering 202 with the parsed body, and nothing else.

Each server gets, with the same client:
  single: N `POST /v1/jobs` of {"task": "demo.echo", "payload": {"n": i}};
  batch:  N jobs as ceil(N / B) `POST /v1/jobs/batch` of {"jobs": [...]} with B jobs each.
The requests are sent by C concurrent clients, each on one keep-alive HTTP/1.1 connection
opened before the clock starts and taking the next request from a shared list until it is
empty; the clock stops when the last response is read. The request bytes are built before
the clock starts. The default client (`--client raw`) is a minimal asyncio HTTP/1.1 client
in this process: it costs about a fifth of httpx's CPU per request, so the client does not
cap the bare server on a small machine. `--client httpx` uses C threads, each with its own
`httpx.Client`, instead. Only 202 answers count as accepted; every other status is
counted and reported, and makes the run exit 1.

Before timing, each server must answer `GET /healthz` within --boot-timeout (Conveyor also
`GET /readyz`, database and broker), and is warmed up with --warmup single requests and
--warmup-batches batches. With --rounds R the four measurements are repeated R times
(alternating which server goes first), and the table shows the median round of each row.

Besides requests/s and jobs/s, the table shows per job: the CPU time of the server process
(from /proc), of Conveyor's PostgreSQL backends (the pids pg_stat_activity lists for the
temporary database, from /proc; WAL writer and fsync time are not included), of the whole
Redis server (INFO cpu; other users of that Redis count too), and of this client process.

At the end the jobs table must hold exactly as many jobs as Conveyor accepted (warm-up
included) and the Redis queues exactly as many messages as were published (accepted jobs
not answered with `Conveyor-Publish: deferred`). Then, unless --breakdown-samples is 0, the
steps of Conveyor's submit path are timed serially in this process against the same
database and broker, with the same wiring as `conveyor api` (`build_platform`, pool of 20):
parsing and validating the body, the INSERT transaction, the publish, the `published_at`
UPDATE transaction and building the response, beside a bare `SELECT 1` session. Servers
are stopped (SIGTERM, then SIGKILL to the process group) on success, error and Ctrl-C, and
every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psycopg
import redis
from sqlalchemy import text

from bench.api_servers import (
    BARE,
    CONVEYOR,
    TENANT,
    ApiDatabase,
    Target,
    api_database,
    api_servers,
)
from bench.bare_api import BareBatchIn, BareJobIn
from bench.brokers import BenchBroker, check_bench_broker
from bench.databases import PG_ADMIN_URL
from bench.harness import positive_int, run_guarded
from bench.processes import HOST, BenchError, process_cpu
from conveyor.api.routes.jobs import request_hash
from conveyor.api.schemas import BatchIn, BatchOut, JobIn, JobOut
from conveyor.cli.wiring import build_platform
from conveyor.config import POOLS, Settings
from conveyor.jobs import store
from conveyor.jobs.models import NewJob
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

TASK = "demo.echo"
SINGLE = "single"
BATCH = "batch"
# The same pool size as `conveyor api` (conveyor.cli.services.api).
API_POOL_SIZE = 20


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    requests: int
    batch_size: int
    clients: int
    client: str
    rounds: int
    warmup: int
    warmup_batches: int
    broker: str
    pg_admin_url: str
    boot_timeout: float
    request_timeout: float
    phase_timeout: float
    breakdown_samples: int
    keep_logs: bool


class ClientOptions(Protocol):
    """What the HTTP clients read from a benchmark's options."""

    @property
    def clients(self) -> int: ...
    @property
    def client(self) -> str: ...
    @property
    def request_timeout(self) -> float: ...
    @property
    def phase_timeout(self) -> float: ...


@dataclass(frozen=True)
class Call:
    """One request, ready to send: its path, its JSON body and how many jobs it carries."""

    path: str
    body: bytes
    jobs: int


@dataclass
class Tally:
    """What the responses of one phase said."""

    accepted_requests: int = 0
    accepted_jobs: int = 0
    deferred_jobs: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, call: Call, status: int, body: bytes, deferred: bool, seconds: float) -> None:
        """Count one response."""
        jobs = call.jobs
        if status == 202 and call.jobs > 1:
            jobs = len(json.loads(body)["jobs"])
        with self.lock:
            self.statuses[status] += 1
            self.latencies.append(seconds)
            if status == 202:
                self.accepted_requests += 1
                self.accepted_jobs += jobs
                if deferred:
                    self.deferred_jobs += jobs
            elif not self.first_error:
                self.first_error = f"{status}: {body[:300].decode(errors='replace')}"


@dataclass(frozen=True)
class Phase:
    """What one timed phase measured; times in seconds."""

    side: str
    mode: str
    requests: int
    tally: Tally
    seconds: float
    server_cpu: float | None
    client_cpu: float
    pg_cpu: float | None = None
    redis_cpu: float | None = None
    load: tuple[float, float] = (0.0, 0.0)

    @property
    def request_rate(self) -> float:
        """Accepted requests per second."""
        return self.tally.accepted_requests / self.seconds if self.seconds > 0 else math.nan

    @property
    def job_rate(self) -> float:
        """Accepted jobs per second."""
        return self.tally.accepted_jobs / self.seconds if self.seconds > 0 else math.nan

    @property
    def errors(self) -> int:
        """Responses other than 202."""
        return sum(n for status, n in self.tally.statuses.items() if status != 202)

    def latency_ms(self, quantile: float) -> float:
        """A latency quantile in milliseconds (nearest rank)."""
        values = sorted(self.tally.latencies)
        if not values:
            return math.nan
        return 1000 * values[min(len(values) - 1, max(0, math.ceil(quantile * len(values)) - 1))]

    def per_job_ms(self, cpu: float | None) -> float | None:
        """CPU seconds spread over the accepted jobs, in milliseconds."""
        if cpu is None or not self.tally.accepted_jobs:
            return None
        return 1000 * cpu / self.tally.accepted_jobs


# --------------------------------------------------------------------------- requests


def job_body(i: int) -> dict[str, Any]:
    """The body of job i."""
    return {"task": TASK, "payload": {"n": i}}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def single_calls(count: int, start: int = 0) -> list[Call]:
    """`count` POST /v1/jobs requests."""
    return [Call("/v1/jobs", _dumps(job_body(start + i)), 1) for i in range(count)]


def batch_calls(count: int, size: int, start: int = 0) -> list[Call]:
    """`count` jobs as POST /v1/jobs/batch requests of up to `size` jobs each."""
    calls = []
    for offset in range(0, count, size):
        n = min(size, count - offset)
        body = {"jobs": [job_body(start + offset + i) for i in range(n)]}
        calls.append(Call("/v1/jobs/batch", _dumps(body), n))
    return calls


# --------------------------------------------------------------------------- clients


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request and read its response (Content-Length bodies only)."""
    writer.write(data)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    length = headers.get(b"content-length")
    if length is None:
        raise BenchError(f"a response without Content-Length (status {status}): unsupported")
    return status, headers, await reader.readexactly(int(length))


def _raw_request(target: Target, call: Call) -> bytes:
    head = [
        f"POST {call.path} HTTP/1.1",
        f"Host: {HOST}:{target.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(call.body)}",
        *(f"{name}: {value}" for name, value in target.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + call.body


async def _raw_phase(
    target: Target, calls: Sequence[Call], clients: int, opts: ClientOptions, tally: Tally
) -> float:
    """Send `calls` over `clients` keep-alive connections; the seconds from first to last."""
    prepared = [(call, _raw_request(target, call)) for call in calls]
    queue: Iterator[tuple[Call, bytes]] = iter(prepared)
    timeout = opts.request_timeout

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(HOST, target.port), timeout)

    async def client(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        reader, writer = connection
        try:
            for call, data in queue:
                started = time.perf_counter()
                status, headers, body = await asyncio.wait_for(
                    _exchange(reader, writer, data), timeout
                )
                elapsed = time.perf_counter() - started
                tally.record(
                    call, status, body, headers.get(b"conveyor-publish") == b"deferred", elapsed
                )
                if headers.get(b"connection", b"").lower() == b"close":
                    writer.close()
                    reader, writer = await connect()
        finally:
            writer.close()

    connections = await asyncio.gather(*(connect() for _ in range(min(clients, len(calls)))))
    started = time.perf_counter()
    try:
        async with asyncio.timeout(opts.phase_timeout), asyncio.TaskGroup() as group:
            for connection in connections:
                group.create_task(client(connection))
    except TimeoutError:
        raise BenchError(f"{target.side}: the phase took over {opts.phase_timeout:.0f}s") from None
    except ExceptionGroup as group_error:
        first = group_error.exceptions[0]
        if isinstance(first, BenchError):
            raise first from None
        raise BenchError(f"{target.side}: client failed: {type(first).__name__}: {first}") from None
    return time.perf_counter() - started


def _httpx_phase(
    target: Target, calls: Sequence[Call], clients: int, opts: ClientOptions, tally: Tally
) -> float:
    """Send `calls` from `clients` threads, each with its own keep-alive httpx.Client."""
    base = f"http://{HOST}:{target.port}"
    headers = {"Content-Type": "application/json", **target.headers}
    queue = iter(calls)
    lock = threading.Lock()
    failures: list[BaseException] = []
    stop = threading.Event()
    count = min(clients, len(calls))
    sessions = [httpx.Client(base_url=base, timeout=opts.request_timeout) for _ in range(count)]

    def client(session: httpx.Client) -> None:
        try:
            while not stop.is_set():
                with lock:
                    call = next(queue, None)
                if call is None:
                    return
                started = time.perf_counter()
                response = session.post(call.path, content=call.body, headers=headers)
                elapsed = time.perf_counter() - started
                deferred = response.headers.get("conveyor-publish") == "deferred"
                tally.record(call, response.status_code, response.content, deferred, elapsed)
        except BaseException as error:
            failures.append(error)
            stop.set()

    try:
        for session in sessions:  # open every connection before the clock starts
            session.get("/healthz").raise_for_status()
        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in sessions]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + opts.phase_timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        elapsed = time.perf_counter() - started
        if any(thread.is_alive() for thread in threads):
            stop.set()
            raise BenchError(f"{target.side}: the phase took over {opts.phase_timeout:.0f}s")
        if failures:
            error = failures[0]
            raise BenchError(f"{target.side}: client failed: {type(error).__name__}: {error}")
        return elapsed
    finally:
        for session in sessions:
            session.close()


def send(target: Target, calls: Sequence[Call], opts: ClientOptions) -> tuple[Tally, float]:
    """Send every call with the chosen client; the tally and the seconds it took."""
    tally = Tally()
    if opts.client == "raw":
        seconds = asyncio.run(_raw_phase(target, calls, opts.clients, opts, tally))
    else:
        seconds = _httpx_phase(target, calls, opts.clients, opts, tally)
    return tally, seconds


# --------------------------------------------------------------------------- CPU accounting


class PgBackends:
    """CPU seconds of the PostgreSQL backends connected to one database (same host only)."""

    def __init__(self, admin_url: str, database: str) -> None:
        self._conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        self._database = database

    def snapshot(self) -> dict[int, float]:
        """CPU seconds per backend pid; empty when /proc cannot tell."""
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self._database,)
        ).fetchall()
        found = {pid: process_cpu(pid) for (pid,) in rows}
        return {pid: cpu for pid, cpu in found.items() if cpu is not None}

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float | None:
        """CPU seconds spent between two snapshots (new backends from zero)."""
        if not after:
            return None
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

    def close(self) -> None:
        """Close the admin connection."""
        self._conn.close()


def redis_cpu(client: redis.Redis) -> float:
    """User + system CPU seconds of the whole Redis server."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# --------------------------------------------------------------------------- phases


def measure(
    target: Target,
    mode: str,
    calls: Sequence[Call],
    opts: Options,
    pg: PgBackends | None,
    client: redis.Redis | None,
) -> Phase:
    """Time one phase and the CPU each party spent in it."""
    pg_before = pg.snapshot() if pg else {}
    redis_before = redis_cpu(client) if client else 0.0
    server_before = process_cpu(target.process.process.pid)
    load_start = os.getloadavg()[0]
    client_before = time.process_time()
    tally, seconds = send(target, calls, opts)
    client_cpu = time.process_time() - client_before
    load_end = os.getloadavg()[0]
    server_after = process_cpu(target.process.process.pid)
    target.process.check_alive()
    server_cpu = (
        None if server_before is None or server_after is None else server_after - server_before
    )
    return Phase(
        side=target.side,
        mode=mode,
        requests=len(calls),
        tally=tally,
        seconds=seconds,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        pg_cpu=PgBackends.spent(pg_before, pg.snapshot()) if pg else None,
        redis_cpu=redis_cpu(client) - redis_before if client else None,
        load=(load_start, load_end),
    )


def check_mirror() -> None:
    """Fail when the bare models no longer have JobIn's and BatchIn's fields."""
    for ours, theirs in ((BareJobIn, JobIn), (BareBatchIn, BatchIn)):
        if set(ours.model_fields) != set(theirs.model_fields):
            raise BenchError(f"bench.bare_api.{ours.__name__} no longer mirrors {theirs.__name__}")


@dataclass
class Accepted:
    """Jobs Conveyor accepted, and how many of them it left unpublished."""

    jobs: int = 0
    deferred: int = 0

    def add(self, tally: Tally) -> None:
        """Count a phase's (or a warm-up's) accepted jobs."""
        self.jobs += tally.accepted_jobs
        self.deferred += tally.deferred_jobs


def warm_up(target: Target, opts: Options, accepted: Accepted | None) -> None:
    """Single requests and batches before any clock runs; every answer must be 202."""
    calls = single_calls(opts.warmup, start=10**9) + batch_calls(
        opts.warmup_batches * opts.batch_size, opts.batch_size, start=2 * 10**9
    )
    if not calls:
        return
    tally, _ = send(target, calls, opts)
    if tally.accepted_requests != len(calls):
        raise BenchError(f"{target.side} warm-up: {dict(tally.statuses)}; {tally.first_error}")
    if accepted is not None:
        accepted.add(tally)


def run_rounds(
    opts: Options,
    conveyor: Target,
    bare: Target,
    pg: PgBackends,
    client: redis.Redis,
    accepted: Accepted,
) -> list[Phase]:
    """Every round: single then batch, each on both servers, the first server alternating."""
    phases: list[Phase] = []
    singles = single_calls(opts.requests)
    batches = batch_calls(opts.requests, opts.batch_size)
    for number in range(opts.rounds):
        order = (conveyor, bare) if number % 2 == 0 else (bare, conveyor)
        for mode, calls in ((SINGLE, singles), (BATCH, batches)):
            for target in order:
                is_conveyor = target is conveyor
                phase = measure(
                    target,
                    mode,
                    calls,
                    opts,
                    pg if is_conveyor else None,
                    client if is_conveyor else None,
                )
                if is_conveyor:
                    accepted.add(phase.tally)
                phases.append(phase)
                print(
                    f"  round {number + 1} {mode:<6} {target.side:<8} "
                    f"{phase.request_rate:8.1f} req/s {phase.job_rate:9.1f} jobs/s"
                    f"  {dict(phase.tally.statuses)}",
                    file=sys.stderr,
                    flush=True,
                )
    return phases


# --------------------------------------------------------------------------- verification


def verify(database: ApiDatabase, broker: BenchBroker, accepted: Accepted) -> str:
    """Jobs in the table == accepted jobs; messages on the broker == published jobs."""
    total, unpublished = database.job_counts()
    messages = broker.depth(POOLS)
    line = (
        f"verified: jobs in the database {total} == jobs Conveyor accepted {accepted.jobs} "
        f"(warm-up included); unpublished {unpublished} == answered 'deferred' "
        f"{accepted.deferred}; messages on the broker {messages} == published "
        f"{total - unpublished}"
    )
    if total != accepted.jobs:
        raise BenchError(f"the jobs table holds {total} jobs, Conveyor accepted {accepted.jobs}")
    if unpublished != accepted.deferred:
        raise BenchError(f"{unpublished} jobs are unpublished, {accepted.deferred} were deferred")
    if messages != total - unpublished:
        raise BenchError(
            f"the broker holds {messages} messages for {total - unpublished} published"
        )
    return line


# --------------------------------------------------------------------------- breakdown


@dataclass(frozen=True)
class Step:
    """One timed step of the submit path: wall and CPU seconds per sample, jobs per sample."""

    name: str
    wall: list[float]
    cpu: list[float]
    jobs: int

    def wall_ms(self) -> float:
        """The median wall time per job, in milliseconds."""
        return 1000 * statistics.median(self.wall) / self.jobs

    def cpu_ms(self) -> float:
        """The mean CPU time of this thread per job, in milliseconds."""
        return 1000 * statistics.fmean(self.cpu) / self.jobs


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def breakdown(settings: Settings, opts: Options) -> list[Step]:
    """Conveyor's submit steps, one after the other, on the API's own wiring."""
    platform = build_platform(settings, pool_size=API_POOL_SIZE)
    sessions, publisher = platform.sessions, platform.publisher
    names = (
        "parse + validate + hash",
        "INSERT transaction",
        "publish to the broker",
        "UPDATE published_at tx",
        "response model + JSON",
        "(SELECT 1 session)",
    )

    def run(body: bytes, size: int, samples: int) -> list[Step]:
        wall: list[list[float]] = [[] for _ in names]
        cpu: list[list[float]] = [[] for _ in names]
        warm = 5 if size == 1 else 1  # warms the pool, the producer and the caches
        for sample in range(warm + samples):
            marks = [_clock()]
            items = [JobIn.model_validate_json(body)] if size == 1 else None
            if items is None:
                items = BatchIn.model_validate_json(body).jobs
            new: list[NewJob] = [
                build_new_job(
                    registry,
                    tenant=TENANT,
                    task=item.task,
                    payload=item.payload,
                    request_hash=request_hash(item),
                )
                for item in items
            ]
            marks.append(_clock())
            with sessions.begin() as session:
                created = store.create_jobs(session, new)
            marks.append(_clock())
            published = publisher.publish(created)
            marks.append(_clock())
            with sessions.begin() as session:
                store.mark_published(session, published)
            marks.append(_clock())
            if size == 1:
                JobOut.of(created[0]).model_dump_json()
            else:
                BatchOut(jobs=[JobOut.of(job) for job in created]).model_dump_json()
            marks.append(_clock())
            with sessions() as session:
                session.execute(text("SELECT 1"))
            marks.append(_clock())
            if sample >= warm:
                for index in range(len(names)):
                    wall[index].append(marks[index + 1][0] - marks[index][0])
                    cpu[index].append(marks[index + 1][1] - marks[index][1])
        return [Step(name, w, c, size) for name, w, c in zip(names, wall, cpu, strict=True)]

    try:
        single = run(_dumps(job_body(0)), 1, opts.breakdown_samples)
        body = _dumps({"jobs": [job_body(i) for i in range(opts.batch_size)]})
        batch = run(body, opts.batch_size, max(2, opts.breakdown_samples // 100))
        return single + batch
    finally:
        platform.celery.close()
        platform.store.dispose()


# --------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs <= 0 or ours != ours or theirs != theirs:
        return "-"
    return f"{ours / theirs:.3f}x"


def median_phase(phases: Sequence[Phase]) -> Phase:
    """The phase with the median jobs/s (the lower middle one for an even count)."""
    ordered = sorted(phases, key=lambda p: p.job_rate)
    return ordered[(len(ordered) - 1) // 2]


def server_stack() -> str:
    """The uvicorn version and the loop and HTTP implementations `auto` picks here."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {importlib.metadata.version('uvicorn')} ({loop}, {http}), 1 process"


def report(opts: Options, phases: Sequence[Phase]) -> str:
    """The side-by-side table."""
    header = (
        f"{opts.requests} jobs per phase | batch size {opts.batch_size} | {opts.clients} clients "
        f"({opts.client} keep-alive HTTP/1.1) | {opts.rounds} round(s), median shown | "
        f"{server_stack()} | {os.cpu_count()} CPUs"
    )
    note = (
        "CPU columns: milliseconds per accepted job; PG = Conveyor's PostgreSQL backends, "
        "Redis = whole server; load 1m = 1-minute load average at phase start->end"
    )
    columns = (
        f"{'':<24}{'requests':>9}{'req/s':>9}{'jobs/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'errors':>7}{'server':>8}{'PG':>7}{'Redis':>7}{'client':>8}{'load 1m':>12}"
    )
    lines = [header, note, "", columns, "-" * len(columns)]
    for mode in (SINGLE, BATCH):
        chosen = {
            side: median_phase([p for p in phases if p.mode == mode and p.side == side])
            for side in (CONVEYOR, BARE)
        }
        for side in (CONVEYOR, BARE):
            p = chosen[side]
            lines.append(
                f"{f'{mode} {side}':<24}{p.requests:>9}{p.request_rate:>9.1f}{p.job_rate:>9.1f}"
                f"{p.latency_ms(0.5):>8.1f}{p.latency_ms(0.99):>8.1f}{p.errors:>7}"
                f"{_num(p.per_job_ms(p.server_cpu), 3):>8}{_num(p.per_job_ms(p.pg_cpu), 3):>7}"
                f"{_num(p.per_job_ms(p.redis_cpu), 3):>7}{_num(p.per_job_ms(p.client_cpu), 3):>8}"
                f"{f'{p.load[0]:.2f}->{p.load[1]:.2f}':>12}"
            )
        ours, theirs = chosen[CONVEYOR], chosen[BARE]
        lines.append(
            f"{f'{mode} Conveyor / bare':<24}{'':>9}"
            f"{_ratio(ours.request_rate, theirs.request_rate):>9}"
            f"{_ratio(ours.job_rate, theirs.job_rate):>9}"
            f"{_ratio(ours.latency_ms(0.5), theirs.latency_ms(0.5)):>8}"
            f"{_ratio(ours.latency_ms(0.99), theirs.latency_ms(0.99)):>8}{'':>7}"
            f"{_ratio(ours.per_job_ms(ours.server_cpu), theirs.per_job_ms(theirs.server_cpu)):>8}"
        )
        rough = [p for p in (ours, theirs) if p.seconds < 1.0 or p.requests < 2 * opts.clients]
        if rough:
            which = ", ".join(f"{p.side} {p.seconds:.3f}s" for p in rough)
            lines.append(
                f"  note: {mode} with {rough[0].requests} requests for {opts.clients} clients "
                f"({which}) is too short to time well; raise --requests"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def report_breakdown(opts: Options, steps: Sequence[Step]) -> str:
    """The serial step times of Conveyor's submit path."""
    half = len(steps) // 2
    lines = [
        "Conveyor's submit path, step by step, serially in this process (same database, "
        f"broker and wiring as the API; {len(steps[0].wall)} single submissions, "
        f"{len(steps[half].wall)} batches of {opts.batch_size}); milliseconds per job, "
        "wall = median, CPU = mean of this thread:",
        f"  {'step':<26}{'single wall':>12}{'single CPU':>12}{'batch wall':>12}{'batch CPU':>11}",
    ]
    totals = [0.0, 0.0, 0.0, 0.0]
    for single, batch in zip(steps[:half], steps[half:], strict=True):
        values = (single.wall_ms(), single.cpu_ms(), batch.wall_ms(), batch.cpu_ms())
        if not single.name.startswith("("):
            totals = [t + v for t, v in zip(totals, values, strict=True)]
        lines.append(
            f"  {single.name:<26}{values[0]:>12.3f}{values[1]:>12.3f}"
            f"{values[2]:>12.3f}{values[3]:>11.3f}"
        )
    lines.append(
        f"  {'sum of the steps':<26}{totals[0]:>12.3f}{totals[1]:>12.3f}"
        f"{totals[2]:>12.3f}{totals[3]:>11.3f}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return number


def parse_args(argv: Sequence[str] | None) -> Options:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.submit",
        description="Conveyor's HTTP submission rate against a bare FastAPI app.",
    )
    parser.add_argument("--requests", type=positive_int, default=2000, help="jobs per phase")
    parser.add_argument("--batch-size", type=positive_int, default=500, help="jobs per batch")
    parser.add_argument("--clients", type=positive_int, default=8, help="concurrent connections")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="HTTP client")
    parser.add_argument("--rounds", type=positive_int, default=1, help="repeat and show the median")
    parser.add_argument("--warmup", type=_non_negative, default=50, help="single requests")
    parser.add_argument("--warmup-batches", type=_non_negative, default=2, help="batches")
    parser.add_argument(
        "--broker",
        default="redis://127.0.0.1:6379/10",
        help="a Redis URL with a dedicated database number, FLUSHED before and after",
    )
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the db")
    parser.add_argument("--boot-timeout", type=float, default=60.0, help="seconds per server")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument("--phase-timeout", type=float, default=600.0, help="seconds per phase")
    parser.add_argument(
        "--breakdown-samples",
        type=_non_negative,
        default=200,
        help="serial single submissions timed step by step at the end (0: skip)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the server logs")
    args = parser.parse_args(argv)
    if args.batch_size > 1000:
        parser.error("--batch-size must be at most 1000 (the API's limit)")
    check_bench_broker(parser, args.broker, amqp=False)
    return Options(
        requests=args.requests,
        batch_size=args.batch_size,
        clients=args.clients,
        client=args.client,
        rounds=args.rounds,
        warmup=args.warmup,
        warmup_batches=args.warmup_batches,
        broker=args.broker,
        pg_admin_url=args.pg_admin_url,
        boot_timeout=args.boot_timeout,
        request_timeout=args.request_timeout,
        phase_timeout=args.phase_timeout,
        breakdown_samples=args.breakdown_samples,
        keep_logs=args.keep_logs,
    )


def run(opts: Options, broker: BenchBroker, logs: Path) -> tuple[str, int]:
    """Everything between creating the database and dropping it; the report and error count."""
    check_mirror()
    with api_database(opts.pg_admin_url, opts.broker) as database:
        pg = PgBackends(opts.pg_admin_url, database.name)
        try:
            return _with_servers(opts, database, pg, broker, logs)
        finally:
            pg.close()


def _with_servers(
    opts: Options, database: ApiDatabase, pg: PgBackends, broker: BenchBroker, logs: Path
) -> tuple[str, int]:
    with api_servers(database, logs, opts.boot_timeout) as (conveyor, bare):
        accepted = Accepted()
        print("warming up ...", file=sys.stderr, flush=True)
        warm_up(conveyor, opts, accepted)
        warm_up(bare, opts, None)
        print("measuring ...", file=sys.stderr, flush=True)
        phases = run_rounds(opts, conveyor, bare, pg, broker.redis, accepted)
    parts = [report(opts, phases), "", verify(database, broker, accepted)]
    if opts.breakdown_samples:
        print("timing the submit steps ...", file=sys.stderr, flush=True)
        parts += ["", report_breakdown(opts, breakdown(database.settings, opts))]
    errors = sum(phase.errors for phase in phases)
    if errors:
        details = "; ".join(
            f"{p.mode} {p.side}: {dict(p.tally.statuses)} {p.tally.first_error}"
            for p in phases
            if p.errors
        )
        parts += ["", f"ERRORS: {errors} responses were not 202: {details}"]
    return "\n".join(parts), errors


def main(argv: Sequence[str] | None = None) -> int:
    """Run both servers, print the table; 0 on success, 1 on a failed run."""
    opts = parse_args(argv)

    def body(broker: BenchBroker, logs: Path) -> bool:
        text_out, errors = run(opts, broker, logs)
        print(text_out, flush=True)
        return errors == 0

    return run_guarded(
        opts.broker,
        prefix="conveyor-bench-submit-",
        keep_logs=opts.keep_logs,
        kept="server",
        body=body,
    )


if __name__ == "__main__":
    sys.exit(main())
