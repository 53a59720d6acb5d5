"""The store drivers' shared suite: every test runs on SQLite and on PostgreSQL.

The `sessions` fixture is parametrized over both databases, so each behaviour here is
held to the same answer by both drivers: the database's clock, lease-token fencing,
the stop window of a cancelled run, rescue, publication bookkeeping, listings, gauges
and locks.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import retention, store
from conveyor.jobs.db import db_now
from conveyor.jobs.models import Job, JobError
from conveyor.jobs.states import JobState
from conveyor.jobs.store.postgres import PostgresDriver
from conveyor.jobs.store.sqlite import SqliteDriver
from conveyor.jobs.tables import job_events, jobs
from tests.integration.store_values import ERROR, T0, TENANT, WORKER, at, new_job

S = JobState


class Db:
    """Runs each store call in a committed transaction of its own."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.sessions.begin() as session:
            return fn(session, *args, **kwargs)

    def job(self, job_id: uuid.UUID) -> Job:
        job = self(store.get_job, job_id)
        assert job is not None
        return job

    def events(self, job_id: uuid.UUID) -> list[str]:
        return [e.event for e in self(store.list_events, job_id)]

    def now(self) -> dt.datetime:
        moment: dt.datetime = self(db_now)
        return moment

    def running(self, **overrides: Any) -> Job:
        """A job created at T0 and claimed at at(1) with a 30-second lease."""
        job = self(store.create_job, new_job(**overrides), now=T0)
        claimed: Job = self(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(1))
        assert claimed.state is S.RUNNING
        return claimed


@pytest.fixture
def db(sessions: sessionmaker[Session]) -> Db:
    return Db(sessions)


def near(moment: dt.datetime | None, expected: dt.datetime, seconds: float = 5.0) -> bool:
    """`moment` is within `seconds` of `expected`."""
    return moment is not None and abs((moment - expected).total_seconds()) <= seconds


# --- the driver itself -------------------------------------------------------------------


def test_the_driver_follows_the_dialect_and_is_kept_for_the_session(
    sessions: sessionmaker[Session],
) -> None:
    with sessions() as session:
        driver = store.driver_for(session)
        dialect = session.get_bind().dialect.name
        assert driver.name == dialect
        kinds = {"sqlite": SqliteDriver, "postgresql": PostgresDriver}
        assert isinstance(driver, kinds[dialect])
        assert driver.single_writer is (dialect == "sqlite")
        assert store.driver_for(session) is driver
        assert driver in session.info.values()


def test_the_database_clock_is_aware_utc_and_current(db: Db) -> None:
    now = db.now()
    assert now.tzinfo is not None and now.utcoffset() == dt.timedelta(0)
    assert near(now, dt.datetime.now(dt.UTC))


# --- create_jobs -------------------------------------------------------------------------


def test_create_jobs_by_the_database_clock_keeps_order_and_waits_only_the_future(
    db: Db,
) -> None:
    now = db.now()
    batch = [
        new_job(run_at=now + dt.timedelta(hours=1)),
        new_job(run_at=now - dt.timedelta(hours=1)),
        new_job(),
    ]
    created: list[Job] = db(store.create_jobs, batch)
    assert [j.id for j in created] == [n.id for n in batch]
    assert [j.state for j in created] == [S.SCHEDULED, S.QUEUED, S.QUEUED]
    assert created[0].run_after == batch[0].run_at
    assert created[1].run_after is None and created[1].scheduled_at == batch[1].run_at
    assert all(near(j.created_at, now) for j in created)
    for job in created:
        assert db.job(job.id) == job
        assert db.events(job.id) == ["created"]


def test_create_jobs_refuses_a_repeated_idempotency_key_within_a_tenant(db: Db) -> None:
    first = db(store.create_job, new_job(idempotency_key="k", request_hash="h"), now=T0)
    with pytest.raises(IntegrityError):
        db(store.create_jobs, [new_job(), new_job(idempotency_key="k")], now=T0)
    other = db(store.create_job, new_job(tenant="globex", idempotency_key="k"), now=T0)
    assert db(store.find_by_idempotency_key, TENANT, "k") == first
    assert db(store.find_by_idempotency_key, "globex", "k") == other
    assert db(store.find_by_idempotency_key, TENANT, "missing") is None
    with db.sessions() as session:
        assert session.execute(select(func.count()).select_from(jobs)).scalar_one() == 2


# --- mark_published ----------------------------------------------------------------------


def test_mark_published_stamps_by_the_database_clock_and_only_once(db: Db) -> None:
    a = db(store.create_job, new_job(), now=T0)
    b = db(store.create_job, new_job(), now=T0)
    db(store.mark_published, [a.id])
    stamped = db.job(a.id).published_at
    assert near(stamped, db.now())
    db(store.mark_published, [a.id, b.id], now=at(5))
    assert db.job(a.id).published_at == stamped
    assert db.job(b.id).published_at == at(5)
    db(store.mark_published, [])
    assert db.job(b.id).published_at == at(5)


# --- claim and the lease token -----------------------------------------------------------


def test_claim_by_the_database_clock_takes_the_next_token_and_its_lease(db: Db) -> None:
    job = db(store.create_job, new_job(), now=T0)
    claimed: Job = db(store.claim, job.id, worker=WORKER, lease_seconds=20, limit_key="k1")
    now = db.now()
    assert (claimed.state, claimed.attempts, claimed.lease_token) == (S.RUNNING, 1, 1)
    assert claimed.worker == WORKER and claimed.limit_key == "k1"
    assert near(claimed.started_at, now)
    assert claimed.lease_expires_at is not None and claimed.started_at is not None
    lease = (claimed.lease_expires_at - claimed.started_at).total_seconds()
    assert lease == pytest.approx(20, abs=0.01)
    assert db(store.claim, job.id, worker=WORKER, lease_seconds=20) is None
    assert db.events(job.id) == ["created", "claimed"]
    assert db(store.count_running, task="demo.echo", limit_key="k1") == 1


def test_a_stale_token_is_refused_by_every_holder_operation(db: Db) -> None:
    first = db.running()
    released = db(store.release, first.id, worker=WORKER, token=1, reason="shutdown", now=at(2))
    assert released.state is S.QUEUED and released.attempts == 1
    again: Job = db(store.claim, first.id, worker=WORKER, lease_seconds=30, now=at(3))
    assert (again.lease_token, again.attempts) == (2, 2)
    stale = {"worker": WORKER, "token": 1}
    before = db.job(first.id)
    assert db(store.succeed, first.id, **stale, result=1, now=at(4)) is None
    assert db(store.fail_retry, first.id, **stale, error=ERROR, delay_seconds=1) is None
    assert db(store.dead, first.id, **stale, error=ERROR, now=at(4)) is None
    assert db(store.release, first.id, **stale, reason="x", now=at(4)) is None
    assert db(store.renew_leases, [(first.id, 1)], lease_seconds=30, now=at(4)) == set()
    assert db.job(first.id) == before
    done: Job = db(store.succeed, first.id, worker=WORKER, token=2, result={"ok": 1})
    assert done.state is S.SUCCEEDED and done.result == {"ok": 1}
    assert done.lease_expires_at is None and near(done.finished_at, db.now())
    assert db.events(first.id) == ["created", "claimed", "released", "claimed", "succeeded"]


def test_succeed_with_a_fixed_time_records_it(db: Db) -> None:
    job = db.running()
    done: Job = db(store.succeed, job.id, worker=WORKER, token=1, result=[1, 2], now=at(9))
    assert (done.state, done.finished_at, done.updated_at) == (S.SUCCEEDED, at(9), at(9))
    assert db(store.succeed, job.id, worker=WORKER, token=1, result=3, now=at(10)) is None


# --- failure, retry, dead letters --------------------------------------------------------


def test_a_failed_attempt_waits_then_is_promoted_and_claimed_again(db: Db) -> None:
    job = db.running()
    db(store.mark_published, [job.id], now=at(1))
    retrying: Job = db(
        store.fail_retry, job.id, worker=WORKER, token=1, error=ERROR, delay_seconds=10, now=at(2)
    )
    assert retrying.state is S.RETRYING and retrying.run_after == at(12)
    assert retrying.error_type == "ValueError" and retrying.published_at is None
    assert db(store.promote, job.id, now=at(11)) is None
    promoted: Job = db(store.promote, job.id, now=at(12))
    assert promoted.state is S.QUEUED and promoted.run_after is None
    second: Job = db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(13))
    assert (second.attempts, second.lease_token) == (2, 2)
    assert db.events(job.id) == ["created", "claimed", "failed", "promoted", "claimed"]


def test_dead_jobs_are_listed_grouped_counted_and_deleted(db: Db) -> None:
    job = db.running()
    buried: Job = db(store.dead, job.id, worker=WORKER, token=1, error=ERROR, now=at(2))
    assert buried.state is S.DEAD and buried.finished_at == at(2)
    spent = db.running(task="demo.fail", max_attempts=1)
    db(store.release, spent.id, worker=WORKER, token=1, reason="shutdown", now=at(2))
    lost = JobError("WorkerLost", "gone")
    assert db(store.exhaust, spent.id, worker=WORKER, error=lost, now=at(3)).state is S.DEAD
    assert [j.id for j in db(store.list_dead, tenant=TENANT)] == [spent.id, job.id]
    assert [j.id for j in db(store.list_dead, tenant=TENANT, task="demo.echo")] == [job.id]
    assert db(store.list_dead, tenant="globex") == []
    assert sorted(db(store.dead_groups, tenant=TENANT)) == [
        ("demo.echo", "ValueError", "f" * 64, 1),
        ("demo.fail", "WorkerLost", "", 1),
    ]
    assert db(store.dead_counts_by_task) == {"demo.echo": 1, "demo.fail": 1}
    assert not db(store.delete_dead, job.id, tenant="globex")
    assert db(store.delete_dead, job.id, tenant=TENANT)
    assert db(store.get_job, job.id) is None and db(store.list_events, job.id) == []


# --- cancel, requeue, stopped: the stop window -------------------------------------------


def test_a_retry_of_a_cancelled_run_waits_for_the_run_to_stop(db: Db) -> None:
    job = db.running()
    cancelled: Job = db(store.cancel, job.id, tenant=TENANT, now=at(2))
    assert cancelled.state is S.CANCELLED and cancelled.cancel_requested
    assert cancelled.lease_expires_at == at(31)  # the run's stop window
    waiting: Job = db(store.requeue, job.id, tenant=TENANT, now=at(3))
    assert waiting.state is S.SCHEDULED and waiting.run_after == at(31)
    assert waiting.attempts == 0 and not waiting.cancel_requested
    assert db(store.promote, job.id, now=at(10)) is None
    db(store.extend_stop_windows, [(job.id, 1)], lease_seconds=30, now=at(20))
    assert db.job(job.id).lease_expires_at == at(50)
    ended: Job = db(store.stopped, job.id, worker=WORKER, token=1, now=at(21))
    assert ended.lease_expires_at is None and ended.run_after == at(21)
    assert db(store.stopped, job.id, worker=WORKER, token=1, now=at(22)) is None
    assert db(store.promote, job.id, now=at(21)).state is S.QUEUED
    rerun: Job = db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(22))
    assert (rerun.lease_token, rerun.attempts) == (2, 1)
    assert db.events(job.id)[-5:] == ["cancelled", "requeued", "stopped", "promoted", "claimed"]


def test_a_requeue_after_the_stop_window_queues_at_once(db: Db) -> None:
    job = db.running()
    db(store.cancel, job.id, now=at(2))
    queued: Job = db(store.requeue, job.id, now=at(40))
    assert queued.state is S.QUEUED and queued.lease_expires_at is None
    assert db(store.requeue, job.id, now=at(41)) is None
    assert db(store.cancel, job.id, tenant="globex", now=at(42)) is None


# --- leases: renewal and rescue ----------------------------------------------------------


def test_renew_leases_extends_held_runs_only(db: Db) -> None:
    mine = db.running()
    other = db.running()
    db(store.cancel, other.id, now=at(2))
    held = db(store.renew_leases, [(mine.id, 1), (other.id, 1), (mine.id, 7)], lease_seconds=60)
    assert held == {(mine.id, 1)}
    expires = db.job(mine.id).lease_expires_at
    assert near(expires, db.now() + dt.timedelta(seconds=60))
    assert db.job(other.id).lease_expires_at == at(31)
    assert db(store.renew_leases, [], lease_seconds=60) == set()


def test_rescue_requeues_an_expired_run_or_buries_it_when_spent(db: Db) -> None:
    live = db.running()
    retry = db.running()
    spent = db.running(max_attempts=1)
    db(store.renew_leases, [(live.id, 1)], lease_seconds=60, now=at(20))
    expired = set(db(store.expired_leases, now=at(40)))
    assert expired == {retry.id, spent.id}
    assert db(store.rescue, live.id, now=at(40)) is None
    rescued: Job = db(store.rescue, retry.id, now=at(40))
    assert rescued.state is S.QUEUED and rescued.error_type == "WorkerLost"
    assert rescued.lease_expires_at is None and rescued.published_at is None
    buried: Job = db(store.rescue, spent.id, now=at(40))
    assert buried.state is S.DEAD and buried.finished_at == at(40)
    assert db.events(retry.id)[-1] == "rescued" and db.events(spent.id)[-1] == "dead"
    assert db(store.expired_leases, now=at(40)) == []


# --- flow control ------------------------------------------------------------------------


def test_defer_waits_a_queued_job_without_using_an_attempt(db: Db) -> None:
    job = db(store.create_job, new_job(), now=T0)
    deferred: Job = db(
        store.defer, job.id, run_after=at(30), reason="rate", slot_at=at(30), now=at(1)
    )
    assert deferred.state is S.SCHEDULED and deferred.attempts == 0
    assert deferred.slot_at == at(30) and deferred.run_after == at(30)
    assert db(store.defer, job.id, run_after=at(60), reason="rate", now=at(2)) is None
    counts = db(store.counts_by_queue, tenant=TENANT)
    assert counts == {"default": {"scheduled": 1, "rate_limited": 1}}


# --- publication bookkeeping -------------------------------------------------------------


def test_publications_are_forgotten_when_messages_are_lost(db: Db) -> None:
    old = db(store.create_job, new_job(), now=T0)
    new = db(store.create_job, new_job(), now=T0)
    ahead = db.running()
    db(store.mark_published, [old.id], now=at(1))
    db(store.mark_published, [new.id], now=at(50))
    with db.sessions.begin() as session:
        session.execute(jobs.update().where(jobs.c.id == ahead.id).values(published_at=at(60)))
    assert db(store.forget_overtaken_publications, queue="default", grace_seconds=30) == 1
    assert db.job(old.id).published_at is None and db.job(new.id).published_at == at(50)
    assert db(store.forget_stale_publications, queue="default", published_before=at(51)) == 1
    db(store.mark_published, [old.id, new.id], now=at(70))
    db(store.forget_publication, old.id)
    assert db.job(old.id).published_at is None
    assert db(store.forget_publications) == 1
    due = db(store.due_for_publish, cutoff=at(100), now=at(100))
    assert {j.id for j in due} == {old.id, new.id}


# --- read models and locks ---------------------------------------------------------------


def test_list_jobs_page_filters_by_tag_and_pages_by_position(db: Db) -> None:
    made = [
        db(store.create_job, new_job(tags=["x", "y"] if n % 2 else ["z"]), now=at(n))
        for n in range(5)
    ]
    tagged = db(store.list_jobs_page, tenant=TENANT, tag="x", limit=10)
    assert [j.id for j in tagged] == [made[3].id, made[1].id]
    first = db(store.list_jobs_page, tenant=TENANT, limit=2)
    assert [j.id for j in first] == [made[4].id, made[3].id]
    rest = db(
        store.list_jobs_page, tenant=TENANT, limit=10, before=(first[-1].created_at, first[-1].id)
    )
    assert [j.id for j in rest] == [made[2].id, made[1].id, made[0].id]
    assert db(store.list_jobs_page, tenant=TENANT, tag="missing") == []
    assert db(store.list_jobs_page, tenant="globex") == []


def test_an_idempotency_key_lock_is_held_to_the_end_of_the_transaction(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        assert store.lock_idempotency_key(session, TENANT, "k")
        store.lock_limit_key(session, "limit")
        if store.driver_for(session).single_writer:
            return  # one writing transaction at a time: no second one can ask
        with sessions.begin() as rival:
            assert not store.lock_idempotency_key(rival, TENANT, "k")
            assert store.lock_idempotency_key(rival, TENANT, "other")
            assert store.lock_idempotency_key(rival, "globex", "k")
    with sessions.begin() as later:
        assert store.lock_idempotency_key(later, TENANT, "k")


def test_gauges_count_unfinished_work(db: Db) -> None:
    db(store.create_job, new_job(), now=T0)
    db(store.create_job, new_job(queue="high", priority="high"), now=at(5))
    db.running()
    counts = db(store.counts_by_queue)
    assert counts == {"default": {"queued": 1, "running": 1}, "high": {"queued": 1}}
    assert db(store.oldest_queued_by_queue) == {"default": T0, "high": at(5)}


def test_retention_deletes_finished_jobs_through_the_driver(
    sessions: sessionmaker[Session], db: Db
) -> None:
    job = db.running()
    db(store.succeed, job.id, worker=WORKER, token=1, result=None, now=at(2))
    kept = db(store.create_job, new_job(), now=T0)
    deleted = retention.cleanup(
        sessions,
        now=at(2) + dt.timedelta(days=2),
        finished_days=1,
        dead_days=1,
        rollup_days=1,
        pause_seconds=0,
    )
    assert deleted["finished"] == 1
    assert db(store.get_job, job.id) is None and db.job(kept.id).state is S.QUEUED
    with sessions() as session:
        left = session.execute(select(func.count()).select_from(job_events)).scalar_one()
    assert left == 1
