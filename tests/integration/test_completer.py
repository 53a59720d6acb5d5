"""A worker process writes its successes in batches, and a job waiting for its write stays its.

The runs below go through the executor a real worker uses (`create_celery`), on
PostgreSQL and Redis; the completer's first write is held at a gate so that the runs
that finish meanwhile are seen to form the next batch.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.config import Settings
from conveyor.jobs import store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import job_events
from conveyor.worker.app import create_celery
from conveyor.worker.completer import LINGER_BELOW
from conveyor.worker.execute import Executor
from conveyor.worker.runtime import StoreHandle
from tests.integration.test_guarantees import _create, _job, _new

DEADLINE = 10.0


class HeldWrite:
    """Holds the completer's first write until opened; counts the runs of each write."""

    def __init__(self, executor: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
        fast = executor._fast_path
        assert fast is not None
        self.real = fast.succeed_many
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.sizes: list[int] = []
        monkeypatch.setattr(fast, "succeed_many", self.write)

    def write(self, worker: str, runs: Any) -> set[tuple[uuid.UUID, int]]:
        self.sizes.append(len(runs))
        self.entered.set()
        assert self.opened.wait(DEADLINE)
        return self.real(worker, runs)


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


@pytest.fixture
def executor(pg_url: str, redis_url: str) -> Iterator[Executor]:
    handle = StoreHandle(pg_url)
    settings = Settings(database_url=pg_url, broker_url=redis_url, lease_seconds=30)
    yield create_celery(settings, store_handle=handle).conveyor_executor
    handle.dispose()


def events(sessions: sessionmaker[Session], event: str) -> int:
    with sessions() as session:
        query = select(func.count()).select_from(job_events).where(job_events.c.event == event)
        return int(session.execute(query).scalar_one())


def test_successes_that_finish_during_a_write_share_the_next(
    executor: Executor, pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrite(executor, monkeypatch)
    completer = executor.completer
    assert completer is not None
    created = [_create(pg_sessions, _new(payload={"n": n})) for n in range(6)]
    assert executor.run(created[0].id).action == "ran-succeeded"
    assert held.entered.wait(DEADLINE)
    # The run's thread is free while its success waits: five more runs finish meanwhile.
    for job in created[1:]:
        assert executor.run(job.id).action == "ran-succeeded"
    assert _job(pg_sessions, created[1].id).state is JobState.RUNNING
    held.opened.set()
    assert completer.flush(DEADLINE)
    assert held.sizes == [1, 5] and completer.writes == 2
    for n, job in enumerate(created):
        done = _job(pg_sessions, job.id)
        assert done.state is JobState.SUCCEEDED and done.result == {"n": n}
        assert not executor.leases.holds(job.id, done.lease_token)
    assert events(pg_sessions, "succeeded") == 6


def test_a_job_waiting_for_its_write_keeps_its_lease_and_is_not_run_again(
    executor: Executor, pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrite(executor, monkeypatch)
    job = _create(pg_sessions, _new(payload={"once": True}))
    assert executor.run(job.id).action == "ran-succeeded"
    assert held.entered.wait(DEADLINE)
    running = _job(pg_sessions, job.id)
    assert running.state is JobState.RUNNING
    assert executor.leases.holds(job.id, running.lease_token)
    # The lease keeper still renews it, and a second delivery of its message is dropped.
    executor.leases.renew_once()
    assert _job(pg_sessions, job.id).state is JobState.RUNNING
    assert executor.run(job.id).action == "dropped"
    held.opened.set()
    assert executor.completer is not None and executor.completer.flush(DEADLINE)
    done = _job(pg_sessions, job.id)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1
    assert events(pg_sessions, "claimed") == 1


def test_a_success_written_after_a_cancel_is_refused_and_the_run_reported_stopped(
    executor: Executor, pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrite(executor, monkeypatch)
    job = _create(pg_sessions)
    assert executor.run(job.id).action == "ran-succeeded"
    assert held.entered.wait(DEADLINE)
    with pg_sessions.begin() as session:
        assert store.cancel(session, job.id, tenant="acme") is not None
    held.opened.set()
    assert executor.completer is not None and executor.completer.flush(DEADLINE)
    after = _job(pg_sessions, job.id)
    assert after.state is JobState.CANCELLED and after.result is None
    assert events(pg_sessions, "succeeded") == 0
    # The run said it ended, so its stop window is over and a retry may go at once.
    assert after.lease_expires_at is None
    assert not executor.leases.holds(job.id, after.lease_token)


def test_a_write_of_a_few_waits_for_more_and_a_flush_ends_the_wait(
    executor: Executor, pg_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWrite(executor, monkeypatch)
    held.opened.set()
    completer = executor.completer
    assert completer is not None
    # Longer than the test: only a full batch or a flush can end the wait.
    completer.linger = 10 * DEADLINE
    created = [_create(pg_sessions, _new(payload={"n": n})) for n in range(LINGER_BELOW + 1)]
    for job in created[: LINGER_BELOW - 1]:
        assert executor.run(job.id).action == "ran-succeeded"
    assert completer.pending() == LINGER_BELOW - 1 and held.sizes == []
    assert _job(pg_sessions, created[0].id).state is JobState.RUNNING
    # The success that fills a batch ends the wait: all are written by one statement.
    assert executor.run(created[LINGER_BELOW - 1].id).action == "ran-succeeded"
    assert held.entered.wait(DEADLINE)
    assert executor.run(created[LINGER_BELOW].id).action == "ran-succeeded"
    # One alone would wait; a flush (a worker stopping, a test) writes it at once.
    assert completer.flush(DEADLINE)
    assert held.sizes == [LINGER_BELOW, 1] and completer.writes == 2
    for job in created:
        assert _job(pg_sessions, job.id).state is JobState.SUCCEEDED
    assert events(pg_sessions, "succeeded") == LINGER_BELOW + 1
