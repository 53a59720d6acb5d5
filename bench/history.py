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
- `GET /v1/jobs` (first page), a page deep in the past (`cursor` of a day ago),
  `?state=queued`, and `GET /v1/stats?window=3600`, through the API app in this process,
  `--requests` times each, p50 and p99;
- an aggregation run (`rollups.aggregate`) and a retention run with nothing due
  (`retention.cleanup` at the store's settings), the mean of `--runs`.

Each store is measured twice, in turn (empty, full, empty, full), and the better of its
two figures kept, so that a moment's noise on the machine does not decide a ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from fastapi.testclient import TestClient

from bench.databases import PG_ADMIN_URL, temporary_pg_database
from bench.harness import positive_int
from conveyor.api.app import create_app
from conveyor.api.routes.jobs import encode_cursor
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, migrate, retention, rollups
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.fastpath import FastPath, libpq_url
from conveyor.jobs.rollups import set_watermark
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

CHUNK = 1_000_000
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
    SELECT CASE WHEN n % 50 = 0 THEN 'dead' ELSE 'succeeded' END AS state,
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


def timed(call: Callable[[], object], times: int) -> list[float]:
    """Seconds of each of `times` calls."""
    found = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        found.append(time.perf_counter() - started)
    return found


def p(values: list[float], q: float) -> float:
    """The q-quantile of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(database_url: str, key: str, opts: argparse.Namespace) -> dict[str, tuple[str, float]]:
    """Every operation on one store: name -> (unit, value)."""
    settings = Settings(database_url=database_url, broker_url="memory://", api_rate_per_second=0)
    platform = build_platform(settings)
    sessions = platform.sessions
    fast = FastPath(database_url)
    found: dict[str, tuple[str, float]] = {}
    new = [
        build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n})
        for n in range(opts.live)
    ]
    recorded = fast.record(new)
    claims, finishes = [], []
    for job in recorded:
        started = time.perf_counter()
        claimed = fast.claim(job.id, worker="bench:1", lease_seconds=30)
        claims.append(time.perf_counter() - started)
        assert claimed is not None
        started = time.perf_counter()
        fast.succeed_many("bench:1", [(job.id, claimed.lease_token, {"ok": True})])
        finishes.append(time.perf_counter() - started)
    found["claim statement"] = ("µs mean", statistics.mean(claims) * 1e6)
    found["finish statement"] = ("µs mean", statistics.mean(finishes) * 1e6)
    queued = [
        build_new_job(registry, tenant="acme", task="demo.echo", payload={}) for _ in range(200)
    ]
    fast.record(queued)
    headers = {"Authorization": f"Bearer {key}"}
    deep = encode_cursor(dt.datetime.now(dt.UTC) - dt.timedelta(days=1), uuid.UUID(int=0))
    requests = {
        "GET /v1/jobs first page": "/v1/jobs?limit=50",
        "GET /v1/jobs deep cursor": f"/v1/jobs?limit=50&cursor={deep}",
        "GET /v1/jobs?state=queued": "/v1/jobs?limit=50&state=queued",
        "GET /v1/stats?window=3600": "/v1/stats?window=3600",
    }
    with TestClient(create_app(platform.api_state())) as client:
        for name, path in requests.items():
            assert client.get(path, headers=headers).status_code == 200
            seconds = timed(lambda path=path: client.get(path, headers=headers), opts.requests)
            found[f"{name} p50"] = ("ms", p(seconds, 0.5) * 1e3)
            found[f"{name} p99"] = ("ms", p(seconds, 0.99) * 1e3)

    def aggregate() -> None:
        with sessions.begin() as session:
            rollups.aggregate(session, now=dt.datetime.now(dt.UTC))

    def clean() -> None:
        retention.cleanup(
            sessions,
            now=dt.datetime.now(dt.UTC),
            finished_days=opts.days + 1,
            dead_days=opts.days + 1,
            rollup_days=90,
        )

    found["aggregation run"] = ("ms mean", statistics.mean(timed(aggregate, opts.runs)) * 1e3)
    found["retention run, nothing due"] = (
        "ms mean",
        statistics.mean(timed(clean, opts.runs)) * 1e3,
    )
    fast.close()
    platform.store.dispose()
    return found


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
    parser.add_argument("--requests", type=positive_int, default=200, help="requests per path")
    parser.add_argument("--runs", type=positive_int, default=20, help="aggregation/retention runs")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL, help="where to create the dbs")
    opts = parser.parse_args(argv)
    with (
        temporary_pg_database(opts.pg_admin_url) as empty_url,
        temporary_pg_database(opts.pg_admin_url) as full_url,
    ):
        empty_key = prepare(empty_url)
        full_key = prepare(full_url)
        print(f"filling {opts.jobs:,} jobs ...", file=sys.stderr, flush=True)
        fill_seconds = fill(full_url, opts.jobs, opts.days)
        rounds: list[tuple[dict[str, tuple[str, float]], dict[str, tuple[str, float]]]] = []
        for turn in (1, 2):
            print(f"measuring the empty store ({turn}/2) ...", file=sys.stderr, flush=True)
            empty = measure(empty_url, empty_key, opts)
            print(f"measuring the full store ({turn}/2) ...", file=sys.stderr, flush=True)
            rounds.append((empty, measure(full_url, full_key, opts)))
    rows = [
        Row(
            name,
            unit,
            min(r[0][name][1] for r in rounds),
            min(r[1][name][1] for r in rounds),
        )
        for name, (unit, _value) in rounds[0][0].items()
    ]
    print(report(rows, opts, fill_seconds))
    return 0 if all(row.ratio <= GOAL for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
