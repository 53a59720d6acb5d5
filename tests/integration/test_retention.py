"""Retention: exactly what is past its age goes, in short batches, while workers write.

Runs on SQLite and PostgreSQL (the `sessions` fixture).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.config import Settings
from conveyor.jobs import retention, store
from conveyor.jobs.models import NewJob
from conveyor.jobs.tables import anomalies, job_events, job_rollups, jobs
from tests.integration.job_rows import forget_rollups, insert_jobs, job_row
from tests.support import wait_until

NOW = dt.datetime(2030, 6, 1, 12, 0, 30, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
MS = dt.timedelta(milliseconds=1)
RETENTION = {"finished_days": 7, "dead_days": 30, "rollup_days": 90}


@pytest.fixture
def db(sessions: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """The store under test without rollups, before and after."""
    forget_rollups(sessions)
    yield sessions
    forget_rollups(sessions)


def finished(state: str, at: dt.datetime, **kwargs: Any) -> dict[str, Any]:
    started = None if state == "cancelled" else at - dt.timedelta(seconds=5)
    return job_row(
        state=state, created_at=at - 10 * MS * 1000, started_at=started, finished_at=at, **kwargs
    )


def rollup(minute: dt.datetime, task: str) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "task": task,
        "minute": minute,
        "counts": {"succeeded": 1},
        "run_histogram": {},
        "wait_histogram": {},
    }


def episode(ended_at: dt.datetime | None, started_at: dt.datetime | None = None) -> dict[str, Any]:
    began = started_at or (ended_at or NOW) - dt.timedelta(minutes=10)
    return {
        "id": uuid.uuid4(),
        "tenant": "acme",
        "task": "t",
        "signal": "run_p95",
        "started_at": began,
        "last_seen_at": ended_at or began,
        "ended_at": ended_at,
        "value": 2.0,
        "baseline": 1.0,
        "score": 4.0,
    }


def remaining(sessions: sessionmaker[Session]) -> tuple[set[uuid.UUID], Counter[uuid.UUID]]:
    """Ids of the jobs left, and how many events each job id has left."""
    with sessions() as session:
        ids = set(session.execute(select(jobs.c.id)).scalars())
        events = Counter(session.execute(select(job_events.c.job_id)).scalars())
    return ids, events


def test_cleanup_deletes_exactly_what_is_past_retention(db: sessionmaker[Session]) -> None:
    old_year = NOW - 365 * DAY
    doomed = {
        "succeeded just past 7 days": finished("succeeded", NOW - 7 * DAY - MS),
        "cancelled 8 days ago": finished("cancelled", NOW - 8 * DAY, idempotency_key="k-old"),
        "dead just past 30 days": finished("dead", NOW - 30 * DAY - MS),
        **{f"succeeded {n} days ago": finished("succeeded", NOW - n * DAY) for n in range(9, 14)},
    }
    kept = {
        "succeeded exactly 7 days ago": finished("succeeded", NOW - 7 * DAY),
        "succeeded just inside 7 days": finished("succeeded", NOW - 7 * DAY + MS),
        "succeeded yesterday": finished("succeeded", NOW - DAY, idempotency_key="k-new"),
        "dead 8 days ago": finished("dead", NOW - 8 * DAY),
        "dead exactly 30 days ago": finished("dead", NOW - 30 * DAY),
        "queued for a year": job_row(state="queued", created_at=old_year),
        "scheduled for a year": job_row(state="scheduled", created_at=old_year),
        "retrying for a year": job_row(state="retrying", created_at=old_year, started_at=old_year),
        "running for a year": job_row(state="running", created_at=old_year, started_at=old_year),
    }
    insert_jobs(db, [*doomed.values(), *kept.values()], events=3)
    cutoff = (NOW - 90 * DAY).replace(second=0)  # 30 s before the cut: goes
    old_minutes = [cutoff - dt.timedelta(minutes=1), cutoff]
    new_minutes = [cutoff + dt.timedelta(minutes=1), NOW.replace(second=0)]
    with db.begin() as session:
        session.execute(
            insert(job_rollups),
            [rollup(m, t) for m in old_minutes + new_minutes for t in ("a", "b", "c")],
        )

    with db.begin() as session:
        session.execute(
            insert(anomalies),
            [
                episode(ended_at=cutoff - dt.timedelta(minutes=1)),  # goes
                episode(ended_at=cutoff + dt.timedelta(minutes=1)),
                episode(ended_at=None, started_at=cutoff - DAY),  # still open: kept
            ],
        )

    deleted = retention.cleanup(db, now=NOW, batch_size=2, max_batches=100, **RETENTION)

    assert deleted == {"finished": 7, "dead": 1, "rollups": 6, "anomalies": 1}
    with db() as session:
        assert session.execute(select(func.count()).select_from(anomalies)).scalar_one() == 2
    ids, events = remaining(db)
    assert ids == {row["id"] for row in kept.values()}
    assert events == Counter({row["id"]: 3 for row in kept.values()})
    with db() as session:
        minutes = Counter(session.execute(select(job_rollups.c.minute)).scalars())
        # An idempotency key goes with its job, and only then.
        assert store.find_by_idempotency_key(session, "acme", "k-old") is None
        assert store.find_by_idempotency_key(session, "acme", "k-new") is not None
    assert minutes == Counter({m: 3 for m in new_minutes})
    # Nothing more is past retention.
    again = retention.cleanup(db, now=NOW, **RETENTION)
    assert again == {"finished": 0, "dead": 0, "rollups": 0, "anomalies": 0}
    assert remaining(db)[0] == ids


def test_each_call_does_at_most_max_batches(db: sessionmaker[Session]) -> None:
    insert_jobs(db, [finished("succeeded", NOW - n * DAY) for n in range(8, 13)], events=1)
    calls = [
        retention.cleanup(db, now=NOW, batch_size=2, max_batches=1, **RETENTION)["finished"]
        for _ in range(4)
    ]
    # Oldest first, two at a time, until none are left.
    assert calls == [2, 2, 1, 0]
    assert remaining(db) == (set(), Counter())


def test_finished_jobs_and_their_keys_are_kept_at_least_a_day() -> None:
    with pytest.raises(ValueError, match="at least a day"):
        retention.cleanup(sessionmaker(), now=NOW, finished_days=0.5, dead_days=30, rollup_days=90)
    with pytest.raises(ValidationError):
        Settings(retention_finished_days=0.5)
    settings = Settings()
    assert (
        settings.retention_finished_days,
        settings.retention_dead_days,
        settings.retention_rollup_days,
    ) == (7, 30, 90)


class TransactionTimes:
    """Durations of the transactions of one session factory, from first use to commit."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.durations: list[float] = []
        self._began: dict[int, float] = {}
        event.listen(sessions, "after_begin", self._begin)
        event.listen(sessions, "after_commit", self._commit)

    def _begin(self, session: Session, *_args: Any) -> None:
        self._began[id(session)] = time.perf_counter()

    def _commit(self, session: Session) -> None:
        began = self._began.pop(id(session), None)
        if began is not None:
            self.durations.append(time.perf_counter() - began)


def test_cleanup_never_holds_up_workers(db: sessionmaker[Session]) -> None:
    now = store.utcnow()
    old = [finished("succeeded", now - 30 * DAY + n * MS) for n in range(3000)]
    insert_jobs(db, old, events=3)
    cleanup_sessions = sessionmaker(db.kw["bind"], expire_on_commit=False)
    batches = TransactionTimes(cleanup_sessions)

    latencies: list[float] = []
    written: list[uuid.UUID] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def timed(fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with db.begin() as session:
            result = fn(session, *args, **kwargs)
        latencies.append(time.perf_counter() - started)
        return result

    def worker() -> None:
        # What a worker does all day: record a job, claim it, finish it.
        try:
            while not stop.is_set():
                new = NewJob(
                    tenant="acme",
                    task="demo.echo",
                    payload={},
                    priority="default",
                    queue="default",
                    max_attempts=3,
                    timeout_seconds=60,
                )
                job = timed(store.create_job, new)
                timed(store.claim, job.id, worker="w:1", lease_seconds=30)
                timed(store.succeed, job.id, worker="w:1", token=1, result={"ok": True})
                written.append(job.id)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(written) >= 5 or errors, timeout=10, what="the worker writing")
        before = len(written)
        started = time.perf_counter()
        deleted = retention.cleanup(
            cleanup_sessions,
            now=now,
            batch_size=100,
            max_batches=1000,
            **RETENTION,
        )
        elapsed = time.perf_counter() - started
        during = len(written) - before
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and not errors, errors
    print(
        f"\ncleanup of {len(old)} jobs: {elapsed:.2f} s in {len(batches.durations)} batches "
        f"(longest {max(batches.durations) * 1000:.0f} ms); worker did {during} jobs meanwhile, "
        f"slowest store call {max(latencies) * 1000:.0f} ms"
    )
    assert deleted["finished"] == len(old)
    # Short batches, and the worker kept going while they ran.
    assert len(batches.durations) >= len(old) // 100
    assert max(batches.durations) < 1.0
    assert during >= 10
    assert max(latencies) < 1.0
    with db() as session:
        left = session.execute(select(func.count()).select_from(jobs)).scalar_one()
        succeeded = session.execute(
            select(func.count()).select_from(jobs).where(jobs.c.state == "succeeded")
        ).scalar_one()
    # The worker's jobs are recent: every one is still there, finished.
    assert left == succeeded == len(written)
    ids, events = remaining(db)
    assert not {row["id"] for row in old} & (ids | set(events))
