"""The guarantees under the conditions that used to break them, on real PostgreSQL and Redis.

Maintenance with no `high` worker, a retry racing its cancelled run, a forced stop racing
the end of its run, hosts whose clocks disagree, a cancel racing a claim, a database
blip at the success write, and a message lost behind a backlog.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from conveyor.config import Settings
from conveyor.jobs import leader, outbox, store
from conveyor.jobs.db import db_now, make_session_factory
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.states import JobState
from conveyor.jobs.store import cancellation
from conveyor.jobs.tables import jobs, leases
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker.app import create_celery
from conveyor.worker.leases import JobCancelled, LeaseKeeper
from conveyor.worker.maintenance import sweep_lost_messages
from conveyor.worker.runtime import StoreHandle
from tests.support import wait_until

WORKER = "host-a:1"


def _new(task: str = "demo.echo", payload: Any = None, **extra: Any) -> NewJob:
    return build_new_job(registry, tenant="acme", task=task, payload=payload or {}, **extra)


def _create(sessions: sessionmaker[Session], new: NewJob | None = None) -> Job:
    with sessions.begin() as session:
        return store.create_job(session, new or _new())


def _claim(sessions: sessionmaker[Session], job_id: uuid.UUID, lease: float = 30.0) -> Job:
    with sessions.begin() as session:
        job = store.claim(session, job_id, worker=WORKER, lease_seconds=lease)
    assert job is not None
    return job


def _job(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with sessions() as session:
        job = store.get_job(session, job_id)
    assert job is not None
    return job


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


# --- 1. maintenance needs no worker of any pool ---------------------------------------


@pytest.fixture
def redis_app(pg_url: str, redis_url: str) -> Iterator[Any]:
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        rescue_interval_seconds=0.2,
        relay_interval_seconds=0.2,
    )
    handle = StoreHandle(pg_url)
    app = create_celery(settings, store_handle=handle)
    yield app
    app.conveyor_maintainer.stop()
    handle.dispose()


def test_the_leader_rescues_and_relays_with_no_worker_and_nothing_on_user_queues(
    redis_app: Any, pg_sessions: sessionmaker[Session], redis_url: str
) -> None:
    orphan = _create(pg_sessions)
    _claim(pg_sessions, orphan.id, lease=0.3)  # its worker then dies
    unpublished = _create(pg_sessions)  # its submitter died before publishing
    with pg_sessions.begin() as session:
        session.execute(
            update(jobs)
            .where(jobs.c.id == unpublished.id)
            .values(updated_at=db_now(session) - dt.timedelta(seconds=60))
        )
    broker = redis.Redis.from_url(redis_url)

    redis_app.conveyor_maintainer.lead(True)

    wait_until(
        lambda: (
            _job(pg_sessions, orphan.id).state is JobState.QUEUED
            and _job(pg_sessions, orphan.id).published_at is not None
            and _job(pg_sessions, unpublished.id).published_at is not None
        ),
        timeout=15,
        what="the orphan rescued and both jobs published by the leader",
    )
    # Both messages went to the jobs' own queue, and no maintenance message to any queue.
    assert broker.llen("default") == 2
    assert broker.llen("high") == 0 and broker.llen("low") == 0


# --- 3. a retry never reuses a fencing token ------------------------------------------


def test_cancel_then_retry_fences_the_old_run_and_waits_for_it(
    pg_sessions: sessionmaker[Session],
) -> None:
    job = _create(pg_sessions)
    first = _claim(pg_sessions, job.id)
    with pg_sessions.begin() as session:
        assert store.cancel(session, job.id) is not None
        retried = store.requeue(session, job.id)
    assert retried is not None
    # The cancelled run may still be stopping: the retry waits for it.
    assert retried.state is JobState.SCHEDULED and retried.attempts == 0
    with pg_sessions.begin() as session:
        assert store.promote(session, job.id) is None
        assert store.claim(session, job.id, worker=WORKER, lease_seconds=30) is None
        # The old run's renewal fails although worker and attempt number would match.
        assert store.renew_leases(session, [(job.id, first.lease_token)], lease_seconds=30) == set()
        stopped = store.stopped(session, job.id, worker=WORKER, token=first.lease_token)
    assert stopped is not None and stopped.lease_expires_at is None
    with pg_sessions.begin() as session:
        assert store.promote(session, job.id) is not None
    second = _claim(pg_sessions, job.id)
    assert second.attempts == 1 and second.lease_token == first.lease_token + 1
    with pg_sessions.begin() as session:
        stale = store.renew_leases(session, [(job.id, first.lease_token)], lease_seconds=30)
        assert stale == set()
        assert (
            store.succeed(session, job.id, worker=WORKER, token=first.lease_token, result=1) is None
        )
        assert store.succeed(session, job.id, worker=WORKER, token=second.lease_token, result=2)


# --- 4. a forced stop reaches only the run it was meant for ---------------------------


def test_a_forced_stop_never_reaches_the_next_job_of_the_thread(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _claim(sessions, _create(sessions).id)
    second = _claim(sessions, _create(sessions).id)
    with sessions.begin() as session:
        store.cancel(session, first.id)  # the first run is taken away
    keeper = LeaseKeeper(
        sessions=lambda: sessions,
        worker=lambda: WORKER,
        lease_seconds=30,
        interval=3600,
        stop_grace=0.0,
    )
    moved_on = threading.Event()
    go_on = threading.Event()
    outcome: dict[str, Any] = {}

    def run_on_one_thread() -> None:
        keeper.hold(first.id, first.lease_token)
        go_on.wait(10)
        # The first run ends by itself, and this thread starts the next job.
        keeper.drop(first.id, first.lease_token)
        keeper.hold(second.id, second.lease_token)
        moved_on.set()
        try:
            for _ in range(200):  # the next job's work, in small steps
                threading.Event().wait(0.005)
            outcome["second"] = "finished"
        except JobCancelled:
            outcome["second"] = "stopped by a stop meant for the first run"
        finally:
            keeper.drop(second.id, second.lease_token)

    renew = store.renew_leases

    def slow_renewal(*args: Any, **kwargs: Any) -> Any:
        answer = renew(*args, **kwargs)
        if not moved_on.is_set():
            go_on.set()
            moved_on.wait(10)  # the run ends while the answer is on its way back
        return answer

    thread = threading.Thread(target=run_on_one_thread)
    thread.start()
    wait_until(lambda: keeper.holds(first.id, first.lease_token), timeout=5, what="first run held")
    keeper.renew_once()  # first run marked lost
    monkeypatch.setattr(store, "renew_leases", slow_renewal)
    keeper.renew_once()  # its grace is over; the answer arrives after the run moved on
    thread.join(10)
    assert outcome == {"second": "finished"}


# --- 5. the database's clock decides ---------------------------------------------------


def _skew(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """This process's clock runs `seconds` off, for every reader of the host's time."""
    real = dt.datetime.now

    def skewed() -> dt.datetime:
        return real(dt.UTC) + dt.timedelta(seconds=seconds)

    monkeypatch.setattr(store, "utcnow", skewed)
    monkeypatch.setattr(leader, "utcnow", skewed, raising=False)


@pytest.mark.parametrize("skew", [30.0, -30.0])
def test_a_skewed_host_neither_rescues_live_jobs_nor_stretches_leases(
    pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    live = _claim(pg_sessions, _create(pg_sessions).id, lease=10)
    with monkeypatch.context() as skewed:
        _skew(skewed, skew)
        # The skewed host claims, renews and runs rescue.
        mine = _claim(pg_sessions, _create(pg_sessions).id, lease=10)
        with pg_sessions.begin() as session:
            store.renew_leases(session, [(mine.id, mine.lease_token)], lease_seconds=10)
            rescued = [store.rescue(session, i) for i in store.expired_leases(session)]
        assert [r for r in rescued if r is not None] == []
    with pg_sessions() as session:
        now = db_now(session)
        for job_id in (live.id, mine.id):
            job = store.get_job(session, job_id)
            assert job is not None and job.state is JobState.RUNNING
            assert job.lease_expires_at is not None
            left = (job.lease_expires_at - now).total_seconds()
            assert 8 < left <= 10.5, f"lease ends {left:.1f} s from the database's now"


@pytest.mark.parametrize("skew", [30.0, -30.0])
def test_a_skewed_beat_neither_takes_a_held_leadership_nor_keeps_a_lapsed_one(
    pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    with pg_sessions.begin() as session:
        assert leader.hold(session, "test-beat", "steady", 8)
    with monkeypatch.context() as skewed:
        _skew(skewed, skew)
        with pg_sessions.begin() as session:
            assert not leader.hold(session, "test-beat", "skewed", 8)
        with pg_sessions.begin() as session:
            assert leader.hold(session, "test-beat-2", "skewed", 8)
    with pg_sessions() as session:
        expires = session.execute(
            select(leases.c.expires_at).where(leases.c.name == "test-beat-2")
        ).scalar_one()
        left = (expires - db_now(session)).total_seconds()
    assert 6 < left <= 8.5


# --- 6. cancel racing a claim, a blip at the success write, a message lost in a backlog


def test_a_cancel_that_races_a_claim_cancels_the_running_job(
    pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _create(pg_sessions)
    read = store.get_job
    raced = []

    def read_then_claim(session: Session, job_id: uuid.UUID, **kwargs: Any) -> Job | None:
        found = read(session, job_id, **kwargs)
        if not raced:  # a worker claims the job between the cancel's read and its update
            raced.append(_claim(pg_sessions, job_id))
        return found

    monkeypatch.setattr(cancellation, "get_job", read_then_claim)
    with pg_sessions.begin() as session:
        cancelled = store.cancel(session, job.id, tenant="acme")
    assert raced and cancelled is not None and cancelled.state is JobState.CANCELLED
    assert cancelled.lease_token == raced[0].lease_token


def test_a_database_blip_at_the_success_write_is_retried_in_place(
    pg_url: str, redis_url: str, pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = StoreHandle(pg_url)
    app = create_celery(Settings(database_url=pg_url, broker_url=redis_url), store_handle=handle)
    executor = app.conveyor_executor
    fast = executor._fast_path
    assert fast is not None
    assert executor.completer is not None
    real = fast.succeed_many
    failures = [psycopg.OperationalError("server closed the connection unexpectedly")] * 2

    def flaky(*args: Any, **kwargs: Any) -> set[Any]:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(fast, "succeed_many", flaky)
    job = _create(pg_sessions, _new(payload={"keep": "me"}))
    try:
        outcome = executor.run(job.id)
        assert executor.completer.flush(10)
    finally:
        handle.dispose()
    assert not failures
    assert outcome.action == "ran-succeeded"
    done = _job(pg_sessions, job.id)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1
    assert done.result == {"keep": "me"}


def test_a_message_lost_behind_a_backlog_is_published_again(
    redis_app: Any, pg_sessions: sessionmaker[Session], redis_url: str
) -> None:
    broker = redis.Redis.from_url(redis_url)
    publisher = redis_app.conveyor_publisher
    created = [_create(pg_sessions) for _ in range(6)]
    for job in created:  # published one after the other
        outbox.publish_recorded(pg_sessions, publisher, [job])
    wait_until(
        lambda: all(_job(pg_sessions, j.id).published_at is not None for j in created),
        timeout=5,
        what="the marks of publication",
    )
    with pg_sessions.begin() as session:
        session.execute(
            update(jobs)
            .where(jobs.c.id == created[0].id)
            .values(published_at=db_now(session) - dt.timedelta(seconds=30))
        )
    # The first job's message is lost; workers took the next two; three wait behind them.
    lost = created[0]
    assert broker.rpop("default") is not None
    for job in created[1:3]:
        assert broker.rpop("default") is not None
        _claim(pg_sessions, job.id)
    assert broker.llen("default") == 3

    forgotten = sweep_lost_messages(redis_app, redis_app.conveyor_store, grace_seconds=5)

    assert forgotten == 1
    assert _job(pg_sessions, lost.id).published_at is None  # the relay publishes it again
    assert all(_job(pg_sessions, j.id).published_at is not None for j in created[3:])
