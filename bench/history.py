"""What a big history costs the present: the same operations on an empty job store and
on one holding N finished jobs (two events each), side by side, with the ratios.

    uv run python -m bench.history --jobs 10000000

Two temporary PostgreSQL databases are made and migrated. The full one is filled in
the database itself (`INSERT … SELECT` over `generate_series`, a million rows a
statement, then `ANALYZE`): N `demo.echo` jobs of tenant `acme`, succeeded (one in fifty
dead), finished evenly over the last `--days` days but the last hour, each with its
`created` and `succeeded`/`dead` events; the rollups' watermark stands a minute ago on
both, as on a platform whose aggregation keeps up. On each store, then:

- claim and finish: `--live` new jobs recorded, then each claimed and succeeded by the
  worker's fast path (the statements a worker runs), mean microseconds per statement;
- `GET /v1/jobs` (first page), a page deep down the present's jobs (the cursor of the
  middle one of those claimed above, so both stores answer the same 50 jobs),
  `?state=queued`, and `GET /v1/stats?window=3600`, through the API app in this process,
  `--requests` times each, p50 and p99;
- an aggregation run (`rollups.aggregate`) and a retention run with nothing due
  (`retention.cleanup` at the store's settings), the mean of `--runs`.

Both stores are measured at once, call by call in turn (which goes first alternates), so
that the machine's drift in speed falls on both alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from fastapi.testclient import TestClient
from sqlalchemy import text

from bench.brokers import BenchBroker, check_bench_broker
from bench.databases import PG_ADMIN_URL, temporary_pg_database
from bench.harness import positive_int
from bench.processes import Worker, running_worker, wait_for, worker_env
from conveyor.api.app import create_app
from conveyor.api.routes.jobs import encode_cursor
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, migrate, outbox, retention, rollups
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.fastpath import FastPath, libpq_url
from conveyor.jobs.rollups import set_watermark
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

CHUNK = 1_000_000
QUEUE = "default"
# Backends of the database waiting on a lock: all of them, and those blocked by
# retention's own connections.
LOCK_WAITS = """
SELECT count(*),
       count(*) FILTER (WHERE EXISTS (
           SELECT 1 FROM pg_stat_activity b
           WHERE b.pid = ANY (pg_blocking_pids(w.pid)) AND b.application_name = 'retention'))
FROM pg_stat_activity w
WHERE w.datname = current_database() AND w.wait_event_type = 'Lock'
"""
GOAL = 1.2

FILL_JOBS = """
INSERT INTO jobs (id, tenant, task, state, priority, queue, payload, result, error_type,
    error_message, attempts, max_attempts, timeout_seconds, tags, worker, lease_token,
    cancel_requested, created_at, scheduled_at, published_at, started_at, finished_at,
    updated_at, parents_left, parents_failed)
SELECT gen_random_uuid(), 'acme', 'demo.echo', s.state, 'default', 'default', '{}'::jsonb,
    CASE WHEN s.state = 'succeeded' THEN '{}'::jsonb END,
    CASE WHEN s.state = 'dead' THEN 'ValueError' END,
    CASE WHEN s.state = 'dead' THEN 'bad input' END,
    1, 3, 300, '[]'::jsonb, 'history:1', 1, false,
    s.at, s.at, s.at, s.at + interval '10 ms', s.at + interval '20 ms',
    s.at + interval '20 ms', 0, 0
FROM (
    SELECT CASE WHEN n %% 50 = 0 THEN 'dead' ELSE 'succeeded' END AS state,
           %(start)s::timestamptz + (n * %(step)s) * interval '1 second' AS at
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
) AS s
"""

FILL_EVENTS = """
INSERT INTO job_events (job_id, at, event, from_state, to_state, attempt, worker)
SELECT id, created_at, 'created', NULL, 'queued', 0, NULL FROM jobs
WHERE worker = 'history:1'
UNION ALL
SELECT id, finished_at, state, 'running', state, 1, worker FROM jobs
WHERE worker = 'history:1'
"""


@dataclass
class Row:
    """One operation measured on both stores."""

    name: str
    unit: str
    empty: float
    full: float

    @property
    def ratio(self) -> float:
        """full / empty."""
        return self.full / self.empty if self.empty else float("inf")


def fill(database_url: str, jobs: int, days: float) -> float:
    """Write the history; the seconds it took."""
    started = time.perf_counter()
    span = days * 86400 - 3600
    begin = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        # Loaded as a restore would be: secondary indexes built once at the end (sorted,
        # not row by row), and no triggers or foreign-key checks per row.
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('jobs', 'job_events')"
            " AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        ).fetchall()
        for name, _definition in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute("SET session_replication_role = replica")
        for first in range(0, jobs, CHUNK):
            last = min(first + CHUNK, jobs) - 1
            conn.execute(
                FILL_JOBS,
                {"start": begin, "step": span / max(jobs, 1), "first": first, "last": last},
            )
            print(f"  {last + 1:,} jobs", file=sys.stderr, flush=True)
        conn.execute(FILL_EVENTS)
        conn.execute("SET session_replication_role = DEFAULT")
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _name, definition in indexes:
            conn.execute(definition)
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def prepare(database_url: str) -> str:
    """Migrate, put the watermark a minute ago, and make a key; the key."""
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        set_watermark(session, dt.datetime.now(dt.UTC).replace(second=0, microsecond=0))
        key, _ = keys.create_key(session, tenant="acme")
    engine.dispose()
    return key


def p(values: list[float], q: float) -> float:
    """The q-quantile of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Side:
    """One store, its API app and the worker's fast path, for the whole measurement."""

    def __init__(self, database_url: str, key: str, opts: argparse.Namespace) -> None:
        settings = Settings(
            database_url=database_url, broker_url="memory://", api_rate_per_second=0
        )
        self.opts = opts
        self.platform = build_platform(settings)
        self.fast = FastPath(database_url)
        self.client = TestClient(create_app(self.platform.api_state()))
        self.client.__enter__()
        self.headers = {"Authorization": f"Bearer {key}"}
        self.seconds: dict[str, list[float]] = {}
        self.recorded = self.fast.record(
            [
                build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n})
                for n in range(opts.live)
            ]
        )

    def time(self, name: str, call: Callable[[], object]) -> object:
        """Call, and keep its seconds under `name`."""
        started = time.perf_counter()
        found = call()
        self.seconds.setdefault(name, []).append(time.perf_counter() - started)
        return found

    def run(self, index: int) -> None:
        """Claim and finish the index-th of the jobs recorded at start."""
        job = self.recorded[index]
        claimed: Any = self.time(
            "claim", lambda: self.fast.claim(job.id, worker="bench:1", lease_seconds=30)
        )
        assert claimed is not None
        self.time(
            "finish",
            lambda: self.fast.succeed_many("bench:1", [(job.id, claimed.lease_token, {})]),
        )

    @functools.cached_property
    def _paths(self) -> dict[str, str]:
        newest_first = sorted(self.recorded, key=lambda j: (j.created_at, j.id), reverse=True)
        middle = newest_first[len(newest_first) // 2]
        deep = encode_cursor(middle.created_at, middle.id)
        return {
            "GET /v1/jobs first page": "/v1/jobs?limit=50",
            "GET /v1/jobs deep cursor": f"/v1/jobs?limit=50&cursor={deep}",
            "GET /v1/jobs?state=queued": "/v1/jobs?limit=50&state=queued",
            "GET /v1/stats?window=3600": "/v1/stats?window=3600",
        }

    def paths(self) -> dict[str, str]:
        """The requests measured; the deep page is the same 50 jobs on both stores."""
        return self._paths

    def get(self, name: str, path: str) -> None:
        """One request, timed."""
        answer: Any = self.time(name, lambda: self.client.get(path, headers=self.headers))
        assert answer.status_code == 200, answer.text

    def aggregate(self) -> None:
        """One aggregation run, timed."""

        def run() -> None:
            with self.platform.sessions.begin() as session:
                rollups.aggregate(session, now=dt.datetime.now(dt.UTC))

        self.time("aggregation", run)

    def clean(self) -> None:
        """One retention run with nothing due, timed."""
        days = self.opts.days + 1
        self.time(
            "retention",
            lambda: retention.cleanup(
                self.platform.sessions,
                now=dt.datetime.now(dt.UTC),
                finished_days=days,
                dead_days=days,
                rollup_days=90,
            ),
        )

    def figures(self) -> dict[str, tuple[str, float]]:
        """name -> (unit, value) of everything measured."""
        found = {
            "claim statement": ("µs mean", statistics.mean(self.seconds["claim"]) * 1e6),
            "finish statement": ("µs mean", statistics.mean(self.seconds["finish"]) * 1e6),
        }
        for name in self.paths():
            found[f"{name} p50"] = ("ms", p(self.seconds[name], 0.5) * 1e3)
            found[f"{name} p99"] = ("ms", p(self.seconds[name], 0.99) * 1e3)
        found["aggregation run"] = ("ms mean", statistics.mean(self.seconds["aggregation"]) * 1e3)
        found["retention run, nothing due"] = (
            "ms mean",
            statistics.mean(self.seconds["retention"]) * 1e3,
        )
        return found

    def close(self) -> None:
        """Close the app, the connections and the engine."""
        self.client.__exit__(None, None, None)
        self.fast.close()
        self.platform.store.dispose()


def measure(sides: list[Side], opts: argparse.Namespace) -> None:
    """Every operation, call by call on each store in turn (the order alternating), so
    that a drift of the machine's speed falls on both alike."""

    def turns(index: int) -> list[Side]:
        return sides if index % 2 == 0 else sides[::-1]

    for index in range(opts.live):
        for side in turns(index):
            side.run(index)
    for side in sides:
        side.fast.record(
            [
                build_new_job(registry, tenant="acme", task="demo.echo", payload={})
                for _ in range(200)
            ]
        )
    for name in sides[0].paths():
        for side in sides:  # warm each path once
            side.get("warm-up", side.paths()[name])
        for index in range(opts.requests):
            for side in turns(index):
                side.get(name, side.paths()[name])
    for index in range(opts.runs):
        for side in turns(index):
            side.aggregate()
            side.clean()


@dataclass
class Drain:
    """A worker's drain of a batch of jobs, and what retention did meanwhile."""

    jobs: int
    seconds: float
    deleted: int = 0
    retention_seconds: float = 0.0
    retention_running_at_end: bool = False
    # Samples of pg_stat_activity during the drain, and those in which some backend of
    # the database waited on a lock (a worker held up behind the deletes would show).
    samples: int = 0
    lock_waits: int = 0
    behind_deletes: int = 0

    @property
    def rate(self) -> float:
        """Jobs per second, first completion to last."""
        return (self.jobs - 1) / self.seconds if self.seconds > 0 else float("inf")


def _drain_batch(platform: Any, count: int, worker: Worker) -> Drain:
    """Submit `count` demo.echo jobs to the running worker; its rate on them."""
    new = [
        build_new_job(registry, tenant="acme", task="demo.echo", payload={}) for _ in range(count)
    ]
    ids = []
    for start in range(0, count, 500):
        ids += [
            job.id
            for job in outbox.submit(
                platform.sessions, platform.publisher, new[start : start + 500]
            )
        ]
    query = text(
        "SELECT count(*), min(finished_at), max(finished_at) FROM jobs"
        " WHERE id = ANY(:ids) AND state = 'succeeded'"
    )

    def done() -> tuple[int, Any, Any]:
        with platform.sessions() as session:
            row = session.execute(query, {"ids": ids}).one()
        return int(row[0]), row[1], row[2]

    wait_for(lambda: done()[0] >= count, timeout=600, what=f"{count} jobs drained", worker=worker)
    _count, first, last = done()
    return Drain(count, (last - first).total_seconds())


class LockWatch:
    """Samples, every 10 ms, how many backends of the database wait on a lock."""

    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._stop = threading.Event()
        self.samples = 0
        self.waiting = 0
        self.behind_deletes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(LOCK_WAITS).fetchone()
                self.samples += 1
                if row is not None:
                    self.waiting += 1 if row[0] else 0
                    self.behind_deletes += 1 if row[1] else 0
                time.sleep(0.01)

    def __enter__(self) -> LockWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def drain_during_retention(database_url: str, opts: argparse.Namespace) -> tuple[Drain, Drain]:
    """On the full store: a worker's drain alone, then while retention deletes the oldest
    day of the history (its batches, as the cleanup task runs them, back to back)."""
    broker = BenchBroker(opts.broker)
    broker.empty()
    settings = Settings(database_url=database_url, broker_url=opts.broker, api_rate_per_second=0)
    platform = build_platform(settings)
    env = worker_env(
        {
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_BROKER_URL": opts.broker,
            "CONVEYOR_METRICS_PORT": "0",
            "CONVEYOR_LOG_LEVEL": "WARNING",
        }
    )
    argv = [sys.executable, "-m", "conveyor", "worker", "--pool", QUEUE, "--concurrency", "2"]
    logs = Path(tempfile.mkdtemp(prefix="conveyor-bench-history-"))
    try:
        with running_worker("worker", argv, env, logs) as worker:
            _drain_batch(platform, 200, worker)  # the worker is up and warm
            with LockWatch(database_url) as watch:
                alone = _drain_batch(platform, opts.drain, worker)
            alone.samples, alone.lock_waits = watch.samples, watch.waiting
            deleted = {"jobs": 0}
            # Retention on connections of its own, named, so a wait behind it is seen.
            cleaner_engine = make_engine(f"{database_url}?application_name=retention")
            cleaner_sessions = make_session_factory(cleaner_engine)

            def delete_oldest_day() -> None:
                cutoff_days = opts.days - 1
                while True:
                    counts = retention.cleanup(
                        cleaner_sessions,
                        now=dt.datetime.now(dt.UTC),
                        finished_days=cutoff_days,
                        dead_days=cutoff_days,
                        rollup_days=90,
                    )
                    deleted["jobs"] += counts.get("finished", 0) + counts.get("dead", 0)
                    if not counts.get("finished") and not counts.get("dead"):
                        return

            started = time.perf_counter()
            cleaner = threading.Thread(target=delete_oldest_day, daemon=True)
            cleaner.start()
            time.sleep(1.0)  # the deletes are under way before the jobs arrive
            with LockWatch(database_url) as watch:
                during = _drain_batch(platform, opts.drain, worker)
            during.retention_running_at_end = cleaner.is_alive()
            cleaner.join()
            during.deleted = deleted["jobs"]
            during.retention_seconds = time.perf_counter() - started
            during.samples, during.lock_waits = watch.samples, watch.waiting
            during.behind_deletes = watch.behind_deletes
            cleaner_engine.dispose()
    finally:
        broker.empty()
        broker.close()
        platform.store.dispose()
        shutil.rmtree(logs, ignore_errors=True)
    return alone, during


def report(rows: Sequence[Row], opts: argparse.Namespace, fill_seconds: float) -> str:
    """The side-by-side table."""
    lines = [
        f"bench.history | {opts.jobs:,} finished jobs (two events each) over {opts.days:g} days"
        f" against an empty store | filled in {fill_seconds:.0f} s",
        "",
        f"| {'operation':<34} | {'unit':<8} | {'empty':>9} | {'full':>9} | {'ratio':>7} | met |",
        f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 9}|-----|",
    ]
    for row in rows:
        met = "yes" if row.ratio <= GOAL else " NO"
        lines.append(
            f"| {row.name:<34} | {row.unit:<8} | {row.empty:>9.2f} | {row.full:>9.2f} |"
            f" {row.ratio:>6.2f}x | {met} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both stores and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__)
    parser.add_argument("--jobs", type=positive_int, default=10_000_000, help="history rows")
    parser.add_argument("--days", type=float, default=6.0, help="the history's span")
    parser.add_argument("--live", type=positive_int, default=2000, help="jobs claimed and finished")
    parser.add_argument("--requests", type=positive_int, default=1000, help="requests per path")
    parser.add_argument("--runs", type=positive_int, default=20, help="aggregation/retention runs")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the dbs")
    parser.add_argument(
        "--drain",
        type=int,
        default=5000,
        help="jobs a worker drains alone and during a big retention run (0: skip)",
    )
    parser.add_argument(
        "--broker",
        default="redis://127.0.0.1:6379/9",
        help="the drain's broker: a Redis URL with a dedicated database number, FLUSHED",
    )
    opts = parser.parse_args(argv)
    check_bench_broker(parser, opts.broker, amqp=False)
    with (
        temporary_pg_database(opts.pg_admin_url) as empty_url,
        temporary_pg_database(opts.pg_admin_url) as full_url,
    ):
        empty_key = prepare(empty_url)
        full_key = prepare(full_url)
        print(f"filling {opts.jobs:,} jobs ...", file=sys.stderr, flush=True)
        fill_seconds = fill(full_url, opts.jobs, opts.days)
        print("measuring both stores, call by call ...", file=sys.stderr, flush=True)
        sides = [Side(empty_url, empty_key, opts), Side(full_url, full_key, opts)]
        try:
            measure(sides, opts)
            empty, full = (side.figures() for side in sides)
        finally:
            for side in sides:
                side.close()
        drains = drain_during_retention(full_url, opts) if opts.drain else None
    rows = [Row(name, unit, value, full[name][1]) for name, (unit, value) in empty.items()]
    print(report(rows, opts, fill_seconds))
    if drains is not None:
        alone, during = drains
        print(
            f"\ndrain of {opts.drain} jobs by one worker (concurrency 2) on the full store:\n"
            f"  alone: {alone.rate:.0f} jobs/s; a backend waited on a lock in"
            f" {alone.lock_waits} of {alone.samples} samples (the drain's own row locks)\n"
            f"  while retention deleted {during.deleted:,} jobs of the oldest day"
            f" ({during.retention_seconds:.0f} s; still deleting when the drain ended:"
            f" {'yes' if during.retention_running_at_end else 'no'}):"
            f" {during.rate:.0f} jobs/s ({during.rate / alone.rate:.2f}x); a backend waited"
            f" on a lock in {during.lock_waits} of {during.samples} samples, behind retention"
            f" in {during.behind_deletes}"
        )
    return 0 if all(row.ratio <= GOAL for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
