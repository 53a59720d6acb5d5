"""Rollups of finished jobs: equal to SQL over the raw jobs, incremental, and cheap.

The aggregation runs on SQLite and PostgreSQL (the `sessions` fixture); its counts
are checked against a SQL GROUP BY and its percentiles against an independent
nearest-rank computation, and on PostgreSQL against percentile_disc. The cost test
builds a million-row jobs table and times one run over 1,000 new jobs on it against
the same run on an empty table.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
from sqlalchemy import bindparam, delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import migrate, quantiles, rollups
from conveyor.jobs.db import make_engine, make_session_factory
from conveyor.jobs.tables import UTCDateTime, job_rollups, jobs
from tests.integration.job_rows import forget_rollups, insert_jobs, job_row
from tests.support import temporary_pg_database

T0 = dt.datetime(2030, 1, 1, 10, 0, 0, tzinfo=dt.UTC)
TENANTS = ("acme", "globex")
TASKS = ("demo.echo", "demo.sleep", "webhook.deliver")

Key = tuple[str, str, str]  # tenant, task, "YYYY-MM-DD HH:MM"


def minute_text(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """The store under test without rollups or a watermark, before and after."""
    forget_rollups(sessions)
    yield sessions
    forget_rollups(sessions)


def finished_jobs(
    rng: random.Random, first_minute: int, minutes: int, count: int, tenants: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Terminal jobs finishing at microsecond-precise times across whole minutes."""
    rows = []
    for i in range(count):
        state = rng.choices(["succeeded", "dead", "cancelled"], weights=[7, 2, 1])[0]
        # A few land exactly on a minute boundary, which belongs to the later minute.
        if i % 17 == 0:
            finished = at(first_minute + rng.randrange(minutes))
        else:
            finished = at(first_minute) + dt.timedelta(
                microseconds=rng.randrange(minutes * 60_000_000)
            )
        run = dt.timedelta(seconds=10 ** rng.uniform(-4, 2.5))
        wait = dt.timedelta(seconds=10 ** rng.uniform(-4, 1.5))
        started = None if state == "cancelled" and i % 2 else finished - run
        scheduled = (started or finished) - wait
        rows.append(
            job_row(
                state=state,
                tenant=rng.choice(tenants),
                task=rng.choice(TASKS),
                created_at=scheduled,
                scheduled_at=scheduled,
                started_at=started,
                finished_at=finished,
            )
        )
    return rows


def unfinished_jobs(created_at: dt.datetime) -> list[dict[str, Any]]:
    """One job in each unfinished state, none of which a rollup may count."""
    return [
        job_row(state="queued", created_at=created_at),
        job_row(state="scheduled", created_at=created_at),
        job_row(state="retrying", created_at=created_at, started_at=created_at),
        job_row(state="running", created_at=created_at, started_at=created_at),
    ]


def sql_counts(session: Session, before: dt.datetime) -> dict[Key, dict[str, int]]:
    """Counts by tenant, task, minute and state, by SQL GROUP BY over the raw jobs."""
    if session.get_bind().dialect.name == "postgresql":
        minute = "to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')"
    else:
        minute = "strftime('%Y-%m-%d %H:%M', finished_at)"
    statement = text(
        f"SELECT tenant, task, {minute} AS minute, state, count(*) FROM jobs "
        "WHERE finished_at < :before GROUP BY tenant, task, minute, state"
    ).bindparams(_before(before))
    counts: dict[Key, dict[str, int]] = defaultdict(dict)
    for tenant, task, minute_, state, count in session.execute(statement):
        counts[(tenant, task, minute_)][state] = int(count)
    return dict(counts)


def _before(value: dt.datetime) -> Any:
    return bindparam("before", value=value, type_=UTCDateTime())


def reference_rank(values: list[float], percentile: int) -> float:
    """Nearest rank computed apart from the code under test: ceil(p·n) with fractions."""
    ordered = sorted(values)
    return ordered[math.ceil(Fraction(percentile, 100) * len(ordered)) - 1]


def raw_samples(
    session: Session, before: dt.datetime
) -> dict[Key, tuple[list[float], list[float]]]:
    """(run seconds of succeeded jobs, queue waits of started jobs) per rollup key."""
    samples: dict[Key, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    statement = select(
        jobs.c.tenant,
        jobs.c.task,
        jobs.c.state,
        jobs.c.scheduled_at,
        jobs.c.started_at,
        jobs.c.finished_at,
    ).where(jobs.c.finished_at < before)
    for tenant, task, state, scheduled, started, finished in session.execute(statement):
        runs, waits = samples[(tenant, task, minute_text(finished))]
        if state == "succeeded":
            runs.append((finished - started).total_seconds())
        if started is not None:
            waits.append(max(0.0, (started - scheduled).total_seconds()))
    return dict(samples)


def percentile_disc(session: Session, before: dt.datetime) -> dict[Key, tuple[Any, ...]]:
    """PostgreSQL's own percentile_disc of run time and queue wait per rollup key."""
    run = "extract(epoch FROM finished_at - started_at)"
    wait = "greatest(0, extract(epoch FROM started_at - scheduled_at))"
    parts = [
        f"percentile_disc({p}) WITHIN GROUP (ORDER BY {expr}) FILTER (WHERE {cond})"
        for expr, cond in ((run, "state = 'succeeded'"), (wait, "started_at IS NOT NULL"))
        for p in (0.5, 0.95, 0.99)
    ]
    statement = text(
        "SELECT tenant, task, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'), "
        f"{', '.join(parts)} FROM jobs WHERE finished_at < :before GROUP BY 1, 2, 3"
    ).bindparams(_before(before))
    return {
        (r[0], r[1], r[2]): tuple(None if v is None else float(v) for v in r[3:])
        for r in session.execute(statement)
    }


def rollup_rows(session: Session) -> dict[Key, dict[str, Any]]:
    return {
        (r["tenant"], r["task"], minute_text(r["minute"])): dict(r)
        for r in session.execute(select(job_rollups)).mappings()
    }


def within_a_bucket(approx: float | None, exact: float | None) -> bool:
    """A histogram answer is the midpoint of the bucket holding the exact one."""
    if approx is None or exact is None:
        return approx is None and exact is None
    return abs(approx - exact) <= 0.1 * exact + quantiles.BUCKET_FLOOR * 1.1


def assert_rollups_match(session: Session, before: dt.datetime) -> dict[Key, dict[str, Any]]:
    """Every rollup row agrees with SQL over the raw jobs finished before `before`."""
    rows = rollup_rows(session)
    counts = sql_counts(session, before)
    assert {k: r["counts"] for k, r in rows.items()} == counts
    samples = raw_samples(session, before)
    disc = (
        percentile_disc(session, before)
        if session.get_bind().dialect.name == "postgresql"
        else None
    )
    for key, row in rows.items():
        runs, waits = samples[key]
        expected = tuple(
            reference_rank(values, p) if values else None
            for values in (runs, waits)
            for p in (50, 95, 99)
        )
        stored = tuple(row[f"{m}_p{p}"] for m in ("run", "wait") for p in (50, 95, 99))
        assert stored == pytest.approx(expected, abs=1e-6), key
        if disc is not None:
            assert stored == pytest.approx(disc[key], abs=1e-6), key
        run_hist = quantiles.histogram_from_json(row["run_histogram"])
        wait_hist = quantiles.histogram_from_json(row["wait_histogram"])
        assert sum(run_hist.values()) == len(runs) and sum(wait_hist.values()) == len(waits)
        approx = (
            *quantiles.from_histogram(run_hist).as_tuple(),
            *quantiles.from_histogram(wait_hist).as_tuple(),
        )
        assert all(within_a_bucket(a, e) for a, e in zip(approx, expected, strict=True)), key
    return rows


def watermark(sessions: sessionmaker[Session]) -> dt.datetime | None:
    with sessions() as session:
        return rollups.watermark(session)


def aggregate(sessions: sessionmaker[Session], now: dt.datetime, **kwargs: Any) -> int:
    with sessions.begin() as session:
        return rollups.aggregate(session, now=now, **kwargs)


def test_aggregate_equals_sql_and_is_incremental(store: sessionmaker[Session]) -> None:
    rng = random.Random(7)
    first = finished_jobs(rng, 0, 5, 600, TENANTS)
    # Minute 5 is incomplete at the first run: its jobs wait for a later one.
    tail = finished_jobs(rng, 5, 1, 40, TENANTS)
    insert_jobs(store, [*first, *tail, *unfinished_jobs(at(1))])

    # Two minutes per call: the work of one call is bounded, the calls add up.
    written, calls = 0, 0
    while watermark(store) != at(5):
        written += aggregate(store, at(6) + dt.timedelta(seconds=4), max_minutes=2)
        calls += 1
    assert calls == 3  # [0, 2), [2, 4), [4, 5): minute 5 ends less than the lag ago
    with store() as session:
        rows = assert_rollups_match(session, at(5))
    assert written == len(rows) > 0
    assert {k[2] for k in rows} == {minute_text(at(m)) for m in range(5)}
    assert sum(sum(r["counts"].values()) for r in rows.values()) == len(first)

    # Again with nothing new: nothing written, nothing changed.
    assert aggregate(store, at(6) + dt.timedelta(seconds=4)) == 0
    with store() as session:
        assert rollup_rows(session) == rows
    assert watermark(store) == at(5)

    # Later jobs, five hours on: after minute 5, one run skips the empty stretch and
    # takes them up; the rows already written stay as they were.
    later = finished_jobs(rng, 300, 3, 300, TENANTS)
    insert_jobs(store, later)
    new_rows, calls = 0, 0
    while watermark(store) != at(303):
        new_rows += aggregate(store, at(304))
        calls += 1
    assert calls == 2  # [5, 65), then straight to [300, 303)
    with store() as session:
        after = assert_rollups_match(session, at(303))
    assert new_rows == len(after) - len(rows) > 0
    assert {k: v for k, v in after.items() if k in rows} == rows
    assert sum(sum(r["counts"].values()) for r in after.values()) == len(first) + len(tail) + len(
        later
    )


def test_window_stats_merges_rollups_with_the_fresh_tail(store: sessionmaker[Session]) -> None:
    rng = random.Random(11)
    rolled = finished_jobs(rng, 0, 5, 400, ("acme",))
    recent = finished_jobs(rng, 5, 1, 30, ("acme",))
    other_tenant = finished_jobs(rng, 0, 6, 50, ("globex",))
    backlog = [
        job_row(state="queued", created_at=at(3)),
        job_row(state="running", created_at=at(4), started_at=at(4.5)),
        job_row(state="queued", created_at=at(-30)),  # created before the window
    ]
    insert_jobs(store, [*rolled, *recent, *other_tenant, *backlog])
    aggregate(store, at(5) + dt.timedelta(seconds=30))
    assert watermark(store) == at(5)

    since, now = at(1) + dt.timedelta(seconds=20), at(6)
    with store() as session:
        found = {
            w.task: w for w in rollups.window_stats(session, tenant="acme", since=since, now=now)
        }
    # Whole minutes from floor(since); the tail past the watermark counts at once.
    counted = [r for r in (*rolled, *recent) if r["finished_at"] >= at(1)]
    for task in TASKS:
        mine = [r for r in counted if r["task"] == task]
        expected = Counter(r["state"] for r in mine)
        expected.update(
            r["state"] for r in backlog if r["created_at"] >= since and r["task"] == task
        )
        assert found[task].counts == {s: n for s, n in expected.items() if n}
        runs = [
            (r["finished_at"] - r["started_at"]).total_seconds()
            for r in mine
            if r["state"] == "succeeded"
        ]
        waits = [
            (r["started_at"] - r["scheduled_at"]).total_seconds()
            for r in mine
            if r["started_at"] is not None
        ]
        for got, values in (
            (found[task].run_seconds, runs),
            (found[task].queue_wait_seconds, waits),
        ):
            for value, p in zip(got.as_tuple(), (50, 95, 99), strict=True):
                assert within_a_bucket(value, reference_rank(values, p)), (task, p)

    # One rolled-up minute and no tail: the minute's exact percentiles.
    insert_jobs(store, finished_jobs(rng, 2, 1, 60, ("initech",)))
    forget_rollups(store)
    aggregate(store, at(5) + dt.timedelta(seconds=30))
    with store() as session:
        single = rollups.window_stats(session, tenant="initech", since=at(0), now=now)
        exact = raw_samples(session, at(5))
    assert single
    for item in single:
        runs, waits = exact[("initech", item.task, minute_text(at(2)))]
        assert item.run_seconds.as_tuple() == pytest.approx(
            tuple(reference_rank(runs, p) if runs else None for p in (50, 95, 99)), abs=1e-6
        )
        assert item.queue_wait_seconds.as_tuple() == pytest.approx(
            tuple(reference_rank(waits, p) for p in (50, 95, 99)), abs=1e-6
        )


BULK_ROWS = 1_000_000
NEW_ROWS = 1_000
BULK_INSERT = text(
    """
    INSERT INTO jobs (id, tenant, task, state, priority, queue, payload, tags, attempts,
        max_attempts, timeout_seconds, cancel_requested, created_at, scheduled_at,
        started_at, finished_at, updated_at)
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'bulk',
        'demo.echo', 'succeeded', 'default', 'default', '{}'::jsonb, '[]'::jsonb, 1, 3, 60,
        false, t - interval '2 seconds', t - interval '2 seconds', t - interval '1 second',
        t, t
    FROM (SELECT g, :start + g * interval '250 milliseconds' AS t
          FROM generate_series(1, :n) AS g) AS series
    """
)


def timed_aggregate(sessions: sessionmaker[Session], mark: dt.datetime, now: dt.datetime) -> float:
    """Best of three timings of one aggregation over the jobs after `mark`."""
    best = math.inf
    for _ in range(3):
        forget_rollups(sessions)
        with sessions.begin() as session:
            rollups.set_watermark(session, mark)
        started = time.perf_counter()
        with sessions.begin() as session:
            written = rollups.aggregate(session, now=now)
        best = min(best, time.perf_counter() - started)
        with sessions() as session:
            counted = session.execute(select(job_rollups.c.counts)).scalars().all()
        assert written > 0 and sum(sum(c.values()) for c in counted) == NEW_ROWS
    return best


def explain(session: Session, statement: Any) -> str:
    compiled = statement.compile(dialect=session.get_bind().dialect)
    plan = session.connection().exec_driver_sql(f"EXPLAIN {compiled.string}", compiled.params)
    return "\n".join(row[0] for row in plan)


def test_aggregation_cost_follows_new_rows_not_the_table() -> None:
    mark = at(0)
    now = at(11)
    with temporary_pg_database() as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            sessions = make_session_factory(engine)
            new = finished_jobs(random.Random(3), 0, 10, NEW_ROWS, TENANTS)
            insert_jobs(sessions, new)
            empty = timed_aggregate(sessions, mark, now)

            # The same new jobs again, after a million older ones (inserted in key order,
            # which keeps every index append-only and the build fast).
            with sessions.begin() as session:
                session.execute(delete(jobs))
            started = time.perf_counter()
            with sessions.begin() as session:
                session.execute(BULK_INSERT, {"start": mark - dt.timedelta(days=3), "n": BULK_ROWS})
                session.execute(text("ANALYZE jobs"))
            built = time.perf_counter() - started
            insert_jobs(sessions, new)
            with sessions() as session:
                total = session.execute(select(func.count()).select_from(jobs)).scalar_one()
            assert total == BULK_ROWS + NEW_ROWS

            big = timed_aggregate(sessions, mark, now)
            print(
                f"\naggregate() over {NEW_ROWS} new jobs: empty table {empty * 1000:.1f} ms, "
                f"{BULK_ROWS:,}-row table {big * 1000:.1f} ms (table built in {built:.1f} s)"
            )
            assert big < 5 * empty + 0.5

            with sessions() as session:
                plans = [
                    explain(session, rollups.first_finished_query(mark)),
                    explain(session, rollups.finished_query(mark, at(10))),
                ]
            for plan in plans:
                assert "ix_jobs_finished_at" in plan, plan
                assert "Seq Scan on jobs" not in plan, plan
        finally:
            engine.dispose()
