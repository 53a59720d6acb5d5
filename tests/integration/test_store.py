"""Every job-store transition, its refusals and the table's CHECK constraints.

Each test runs on SQLite and on PostgreSQL (the `sessions` fixture is parametrized).
Every store call runs in its own committed transaction, and every refusal is checked
to leave both tables exactly as they were.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import keys, store
from conveyor.jobs.models import Job, JobError, JobEvent
from conveyor.jobs.states import TERMINAL_STATES, JobState, can_move
from conveyor.jobs.store import workflows
from conveyor.jobs.tables import api_keys, job_events, jobs
from tests.integration.store_values import ERROR, OTHER_WORKER, T0, TENANT, WORKER, at, new_job

S = JobState


class Store:
    """Runs store functions each in a committed transaction of its own."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.sessions() as session:
            result = fn(session, *args, **kwargs)
            session.commit()
        return result

    def job(self, job_id: uuid.UUID) -> Job:
        job = self(store.get_job, job_id)
        assert job is not None
        return job

    def events(self, job_id: uuid.UUID) -> list[JobEvent]:
        events: list[JobEvent] = self(store.list_events, job_id)
        return events

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every row of jobs and job_events."""
        with self.sessions() as session:
            job_rows = session.execute(select(jobs).order_by(jobs.c.id)).mappings()
            job_list = [dict(r) for r in job_rows]
            event_rows = session.execute(select(job_events).order_by(job_events.c.id)).mappings()
            event_list = [dict(r) for r in event_rows]
        return job_list, event_list

    def refused(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """`fn` returns None and writes nothing at all."""
        before = self.snapshot()
        assert self(fn, *args, **kwargs) is None
        assert self.snapshot() == before

    def execute_raw(self, statement: Any, params: Any = None) -> None:
        with self.sessions() as session:
            session.execute(statement, params)
            session.commit()


@pytest.fixture
def db(sessions: sessionmaker[Session]) -> Store:
    return Store(sessions)


def in_state(db: Store, state: JobState, **overrides: Any) -> Job:
    """A job brought to `state` through the store itself (created at T0)."""
    if state is S.SCHEDULED:
        job: Job = db(store.create_job, new_job(run_at=at(60), **overrides), now=T0)
        return job
    if state is S.PENDING:
        # A workflow step waiting for its parent.
        def pending(session: Session) -> Job:
            steps = [
                workflows.NewStep("parent", new_job(**overrides)),
                workflows.NewStep("child", new_job(**overrides), ("parent",)),
            ]
            _, made = workflows.create_workflow(
                session, tenant="acme", name=None, tags=[], steps=steps, now=T0
            )
            return made[1]

        waiting: Job = db(pending)
        return waiting
    job = db(store.create_job, new_job(**overrides), now=T0)
    if state is S.QUEUED:
        return job
    if state is S.CANCELLED:
        result: Job = db(store.cancel, job.id, now=at(1))
        return result
    job = db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(1))
    if state is S.RUNNING:
        return job
    if state is S.SUCCEEDED:
        result = db(store.succeed, job.id, worker=WORKER, token=1, result={"ok": 1}, now=at(2))
    elif state is S.RETRYING:
        result = db(
            store.fail_retry,
            job.id,
            worker=WORKER,
            token=1,
            error=ERROR,
            delay_seconds=10,
            now=at(2),
        )
    elif state is S.DEAD:
        result = db(store.dead, job.id, worker=WORKER, token=1, error=ERROR, now=at(2))
    else:  # pragma: no cover - every state is handled above
        raise AssertionError(state)
    assert result.state is state
    return result


def assert_history_follows_table(events: list[JobEvent]) -> None:
    """Each event continues from the previous one along an allowed edge."""
    previous: str | None = None
    for event in events:
        assert event.from_state == previous
        if event.event == "delivery_dropped":
            assert event.to_state == event.from_state
        else:
            source = None if event.from_state is None else JobState(event.from_state)
            assert can_move(source, JobState(event.to_state)), event
        previous = event.to_state
    assert [e.id for e in events] == sorted(e.id for e in events)


ALL_STATES = list(JobState)


@contextmanager
def case(label: object) -> Iterator[None]:
    """Name the case of a loop in the failure report."""
    try:
        yield
    except AssertionError as error:
        error.add_note(f"case: {label}")
        raise


# --- create ---------------------------------------------------------------------------------


def test_create_job_without_run_at_is_queued(db: Store) -> None:
    new = new_job(idempotency_key="k1", request_hash="h" * 64)
    job = db(store.create_job, new, now=T0)

    assert job.id == new.id
    assert job.state is S.QUEUED
    assert (job.tenant, job.task, job.priority, job.queue) == (
        TENANT,
        "demo.echo",
        "default",
        "default",
    )
    assert job.payload == {"n": 1, "nested": {"list": [1, 2, 3]}}
    assert job.tags == ["a", "b"]
    assert (job.attempts, job.max_attempts, job.timeout_seconds) == (0, 3, 60.0)
    assert (job.idempotency_key, job.request_hash) == ("k1", "h" * 64)
    assert job.created_at == job.updated_at == job.scheduled_at == T0
    assert job.run_after is None
    assert job.published_at is job.started_at is job.finished_at is None
    assert job.worker is None and job.lease_expires_at is None
    assert job.cancel_requested is False
    assert job.result is None and job.error is None
    assert db.job(job.id) == job

    [event] = db.events(job.id)
    assert (event.event, event.from_state, event.to_state) == ("created", None, "queued")
    assert (event.attempt, event.worker, event.at) == (0, None, T0)


def test_create_job_with_future_run_at_is_scheduled(db: Store) -> None:
    job = db(store.create_job, new_job(run_at=at(60)), now=T0)

    assert job.state is S.SCHEDULED
    assert job.run_after == at(60)
    assert job.scheduled_at == at(60)
    assert job.created_at == T0
    [event] = db.events(job.id)
    assert (event.event, event.from_state, event.to_state) == ("created", None, "scheduled")


def test_create_job_with_run_at_not_ahead_is_queued(db: Store) -> None:
    for offset in (0, -3600):
        with case(offset):
            job = db(store.create_job, new_job(run_at=at(offset)), now=T0)
            assert job.state is S.QUEUED
            assert job.run_after is None
            assert job.scheduled_at == at(offset)


def test_create_jobs_keeps_order_and_records_one_event_each(db: Store) -> None:
    news = [new_job(), new_job(run_at=at(30)), new_job(payload={"i": 3}), new_job(run_at=at(-5))]
    created = db(store.create_jobs, news, now=T0)

    assert [j.id for j in created] == [n.id for n in news]
    assert [j.state for j in created] == [S.QUEUED, S.SCHEDULED, S.QUEUED, S.QUEUED]
    assert created[2].payload == {"i": 3}
    for job in created:
        [event] = db.events(job.id)
        assert (event.event, event.to_state) == ("created", job.state.value)


def test_create_jobs_with_nothing_writes_nothing(db: Store) -> None:
    before = db.snapshot()
    assert db(store.create_jobs, [], now=T0) == []
    assert db.snapshot() == before


def test_idempotency_key_is_unique_per_tenant(db: Store) -> None:
    first = db(store.create_job, new_job(idempotency_key="same"), now=T0)
    # Another tenant may use the same key.
    db(store.create_job, new_job(tenant="globex", idempotency_key="same"), now=T0)
    before = db.snapshot()
    with pytest.raises(IntegrityError):
        db(store.create_job, new_job(idempotency_key="same"), now=T0)
    assert db.snapshot() == before
    assert db(store.find_by_idempotency_key, TENANT, "same") == first


# --- mark_published -------------------------------------------------------------------------


def test_mark_published_sets_published_at_once(db: Store) -> None:
    a, b, c = (db(store.create_job, new_job(), now=T0) for _ in range(3))
    events_before = db.snapshot()[1]

    db(store.mark_published, [a.id, b.id], now=at(1))
    assert db.job(a.id).published_at == at(1)
    assert db.job(b.id).published_at == at(1)
    assert db.job(c.id).published_at is None

    # A second publish does not move the first time.
    db(store.mark_published, [a.id, c.id], now=at(5))
    assert db.job(a.id).published_at == at(1)
    assert db.job(c.id).published_at == at(5)
    assert db.job(a.id).state is S.QUEUED
    assert db.snapshot()[1] == events_before


def test_mark_published_with_no_ids_writes_nothing(db: Store) -> None:
    db(store.create_job, new_job(), now=T0)
    before = db.snapshot()
    db(store.mark_published, [], now=at(1))
    assert db.snapshot() == before


# --- claim ----------------------------------------------------------------------------------


def test_claim_moves_queued_to_running(db: Store) -> None:
    job = in_state(db, S.QUEUED)
    claimed = db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(1))

    assert claimed.state is S.RUNNING
    assert claimed.attempts == 1
    assert claimed.worker == WORKER
    assert claimed.lease_expires_at == at(31)
    assert claimed.started_at == claimed.updated_at == at(1)
    assert db.job(job.id) == claimed
    _created, event = db.events(job.id)
    assert (event.event, event.from_state, event.to_state) == ("claimed", "queued", "running")
    assert (event.attempt, event.worker, event.at) == (1, WORKER, at(1))


def test_claim_refused_unless_queued(db: Store) -> None:
    for state in ALL_STATES:
        if state is not S.QUEUED:
            with case(state):
                job = in_state(db, state)
                db.refused(store.claim, job.id, worker=OTHER_WORKER, lease_seconds=30, now=at(100))


def test_claim_refused_when_attempts_are_exhausted(db: Store) -> None:
    job = in_state(db, S.RUNNING, max_attempts=1)
    released = db(store.release, job.id, worker=WORKER, token=1, reason="shutdown", now=at(2))
    assert (released.state, released.attempts) == (S.QUEUED, 1)
    db.refused(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(3))


def test_claim_and_promote_refused_for_a_missing_job(db: Store) -> None:
    in_state(db, S.QUEUED)
    in_state(db, S.SCHEDULED)
    db.refused(store.claim, uuid.uuid4(), worker=WORKER, lease_seconds=30, now=at(1))
    db.refused(store.promote, uuid.uuid4(), now=at(10_000))


# --- promote --------------------------------------------------------------------------------


def test_promote_scheduled_once_due(db: Store) -> None:
    job = in_state(db, S.SCHEDULED)  # due at +60
    db(store.mark_published, [job.id], now=at(1))  # a countdown message was sent
    db.refused(store.promote, job.id, now=at(59.999))

    promoted = db(store.promote, job.id, now=at(60))
    assert promoted.state is S.QUEUED
    assert promoted.run_after is None
    assert promoted.published_at is None  # the relay must publish it again
    assert promoted.updated_at == at(60)
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("promoted", "scheduled", "queued")
    # Only once: it is queued now.
    db.refused(store.promote, job.id, now=at(120))


def test_promote_retrying_once_due(db: Store) -> None:
    job = in_state(db, S.RETRYING)  # due at +12
    db.refused(store.promote, job.id, now=at(11))

    promoted = db(store.promote, job.id, now=at(13))
    assert promoted.state is S.QUEUED
    assert promoted.attempts == 1
    assert promoted.run_after is None
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("promoted", "retrying", "queued")
    assert event.attempt == 1


def test_promote_refused_from_other_states(db: Store) -> None:
    for state in ALL_STATES:
        if state not in (S.SCHEDULED, S.RETRYING):
            with case(state):
                job = in_state(db, state)
                db.refused(store.promote, job.id, now=at(10_000))


# --- succeed / fail_retry / dead / release: only for the holder -----------------------------


def _succeed(db: Store, job_id: uuid.UUID, worker: str, attempt: int) -> Any:
    return db(store.succeed, job_id, worker=worker, token=attempt, result=[1], now=at(50))


def _fail_retry(db: Store, job_id: uuid.UUID, worker: str, attempt: int) -> Any:
    return db(
        store.fail_retry,
        job_id,
        worker=worker,
        token=attempt,
        error=ERROR,
        delay_seconds=10,
        now=at(50),
    )


def _dead(db: Store, job_id: uuid.UUID, worker: str, attempt: int) -> Any:
    return db(store.dead, job_id, worker=worker, token=attempt, error=ERROR, now=at(50))


def _release(db: Store, job_id: uuid.UUID, worker: str, attempt: int) -> Any:
    return db(store.release, job_id, worker=worker, token=attempt, reason="x", now=at(50))


HOLDER_OPS = {"succeed": _succeed, "fail_retry": _fail_retry, "dead": _dead, "release": _release}
HolderOp = Callable[[Store, uuid.UUID, str, int], Any]


def refused_op(db: Store, op: HolderOp, job_id: uuid.UUID, worker: str, attempt: int) -> None:
    before = db.snapshot()
    assert op(db, job_id, worker, attempt) is None
    assert db.snapshot() == before


def test_holder_ops_refused_for_another_worker(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    for name, op in HOLDER_OPS.items():
        with case(name):
            refused_op(db, op, job.id, OTHER_WORKER, 1)


def test_holder_ops_refused_for_a_stale_attempt(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    db(store.release, job.id, worker=WORKER, token=1, reason="lost", now=at(2))
    again = db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(3))
    assert again.attempts == 2
    for name, op in HOLDER_OPS.items():
        with case(name):
            # Same worker, but the first attempt no longer holds the job.
            refused_op(db, op, job.id, WORKER, 1)
            refused_op(db, op, job.id, WORKER, 3)


def test_holder_ops_refused_when_not_running(db: Store) -> None:
    for state in ALL_STATES:
        if state is not S.RUNNING:
            job = in_state(db, state)
            for name, op in HOLDER_OPS.items():
                with case(f"{name} from {state}"):
                    refused_op(db, op, job.id, WORKER, job.attempts)
                    refused_op(db, op, job.id, WORKER, 1)


def test_holder_ops_refused_for_a_missing_job(db: Store) -> None:
    in_state(db, S.RUNNING)
    for name, op in HOLDER_OPS.items():
        with case(name):
            refused_op(db, op, uuid.uuid4(), WORKER, 1)


def test_succeed(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    done = db(store.succeed, job.id, worker=WORKER, token=1, result={"out": [1, "x"]}, now=at(5))

    assert done.state is S.SUCCEEDED
    assert done.result == {"out": [1, "x"]}
    assert done.finished_at == done.updated_at == at(5)
    assert done.lease_expires_at is None
    assert done.attempts == 1
    assert db.job(job.id) == done
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("succeeded", "running", "succeeded")
    assert (event.attempt, event.worker, event.at) == (1, WORKER, at(5))


def test_fail_retry(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    db(store.mark_published, [job.id], now=at(1))
    failed = db(
        store.fail_retry,
        job.id,
        worker=WORKER,
        token=1,
        error=ERROR,
        delay_seconds=10.5,
        now=at(2),
    )

    assert failed.state is S.RETRYING
    assert failed.run_after == at(12.5)
    assert failed.published_at is None
    assert failed.lease_expires_at is None
    assert failed.finished_at is None
    assert failed.attempts == 1
    assert failed.error == ERROR
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("failed", "running", "retrying")
    assert (event.attempt, event.worker) == (1, WORKER)
    assert event.detail == {"error_type": "ValueError", "retry_in_seconds": 10.5}


def test_fail_retry_refused_when_attempts_are_exhausted(db: Store) -> None:
    job = in_state(db, S.RUNNING, max_attempts=1)
    db.refused(
        store.fail_retry,
        job.id,
        worker=WORKER,
        token=1,
        error=ERROR,
        delay_seconds=8,
        now=at(2),
    )
    # The holder must then bury it instead.
    assert db(store.dead, job.id, worker=WORKER, token=1, error=ERROR, now=at(2)) is not None


def test_dead(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    error = JobError("X" * 300, "permanent", None, None)
    buried = db(store.dead, job.id, worker=WORKER, token=1, error=error, now=at(4))

    assert buried.state is S.DEAD
    assert buried.finished_at == at(4)
    assert buried.lease_expires_at is None
    assert buried.error_type == "X" * 200  # fits the column
    assert buried.error_message == "permanent"
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("dead", "running", "dead")
    assert (event.attempt, event.worker) == (1, WORKER)
    assert event.detail == {"error_type": "X" * 300}


def test_release_requeues_without_counting_a_failure(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    db(store.mark_published, [job.id], now=at(1))
    released = db(store.release, job.id, worker=WORKER, token=1, reason="shutdown", now=at(3))

    assert released.state is S.QUEUED
    assert released.attempts == 1
    assert released.lease_expires_at is None
    assert released.published_at is None
    assert released.error is None
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("released", "running", "queued")
    assert (event.worker, event.detail) == (WORKER, {"reason": "shutdown"})

    again = db(store.claim, job.id, worker=OTHER_WORKER, lease_seconds=5, now=at(4))
    assert (again.state, again.attempts, again.worker) == (S.RUNNING, 2, OTHER_WORKER)


# --- exhaust --------------------------------------------------------------------------------


def test_exhaust_buries_a_queued_job_with_no_attempts_left(db: Store) -> None:
    job = in_state(db, S.RUNNING, max_attempts=1)
    db(store.release, job.id, worker=WORKER, token=1, reason="lost", now=at(2))
    error = JobError("AttemptsExhausted", "delivered with no attempts left")
    buried = db(store.exhaust, job.id, worker=OTHER_WORKER, error=error, now=at(3))

    assert buried.state is S.DEAD
    assert buried.finished_at == at(3)
    assert buried.error == error
    event = db.events(job.id)[-1]
    assert (event.event, event.from_state, event.to_state) == ("dead", "queued", "dead")
    assert (event.worker, event.detail) == (OTHER_WORKER, {"error_type": "AttemptsExhausted"})


def test_exhaust_refused_while_attempts_remain(db: Store) -> None:
    job = in_state(db, S.QUEUED)
    db.refused(store.exhaust, job.id, worker=WORKER, error=ERROR, now=at(3))


def test_exhaust_refused_unless_queued(db: Store) -> None:
    for state in ALL_STATES:
        if state is not S.QUEUED:
            with case(state):
                # Where it can, the job has used its only attempt: only its state stands
                # in the way.
                job = in_state(db, state, max_attempts=3 if state is S.RETRYING else 1)
                db.refused(store.exhaust, job.id, worker=WORKER, error=ERROR, now=at(3))


# --- cancel ---------------------------------------------------------------------------------


def test_cancel(db: Store) -> None:
    for state in (S.SCHEDULED, S.QUEUED, S.RETRYING, S.RUNNING):
        with case(state):
            job = in_state(db, state)
            cancelled = db(store.cancel, job.id, tenant=TENANT, now=at(7))

            assert cancelled.state is S.CANCELLED
            assert cancelled.finished_at == cancelled.updated_at == at(7)
            assert cancelled.cancel_requested is True
            assert cancelled.run_after is None
            # A running job's lease stays as its run's stop window (see requeue).
            kept = job.lease_expires_at if state is S.RUNNING else None
            assert cancelled.lease_expires_at == kept
            assert db.job(job.id) == cancelled
            event = db.events(job.id)[-1]
            assert (event.event, event.from_state, event.to_state) == (
                "cancelled",
                state,
                "cancelled",
            )
            # The event names the worker that last held the job, if any did.
            assert event.worker == job.worker
            assert event.worker == (None if state in (S.SCHEDULED, S.QUEUED) else WORKER)


def test_cancel_refused_from_terminal_states(db: Store) -> None:
    for state in sorted(TERMINAL_STATES):
        with case(state):
            job = in_state(db, state)
            db.refused(store.cancel, job.id, now=at(100))
    db.refused(store.cancel, uuid.uuid4(), now=at(100))


def test_cancel_is_scoped_to_the_tenant(db: Store) -> None:
    job = in_state(db, S.QUEUED)
    db.refused(store.cancel, job.id, tenant="globex", now=at(5))
    assert db(store.cancel, job.id, tenant=TENANT, now=at(6)).state is S.CANCELLED


# --- requeue --------------------------------------------------------------------------------


def test_requeue(db: Store) -> None:
    for state in (S.DEAD, S.CANCELLED):
        with case(state):
            job = in_state(db, state)
            db(store.mark_published, [job.id], now=at(3))
            requeued = db(store.requeue, job.id, tenant=TENANT, now=at(9))

            assert requeued.state is S.QUEUED
            assert requeued.attempts == 0
            assert requeued.finished_at is None
            assert requeued.worker is None
            assert requeued.cancel_requested is False
            assert requeued.published_at is None
            assert requeued.updated_at == at(9)
            assert requeued.id == job.id
            event = db.events(job.id)[-1]
            assert (event.event, event.from_state, event.to_state) == ("requeued", state, "queued")
            assert event.attempt == 0

            # It runs again with its attempts counted afresh.
            again = db(store.claim, job.id, worker=OTHER_WORKER, lease_seconds=30, now=at(10))
            assert (again.state, again.attempts) == (S.RUNNING, 1)


def test_requeue_refused_from_other_states(db: Store) -> None:
    for state in ALL_STATES:
        if state not in (S.DEAD, S.CANCELLED):
            with case(state):
                job = in_state(db, state)
                db.refused(store.requeue, job.id, now=at(100))
    db.refused(store.requeue, uuid.uuid4(), now=at(100))


def test_requeue_is_scoped_to_the_tenant(db: Store) -> None:
    job = in_state(db, S.DEAD)
    db.refused(store.requeue, job.id, tenant="globex", now=at(5))
    assert db(store.requeue, job.id, tenant=TENANT, now=at(6)).state is S.QUEUED


# --- record_dropped_delivery ----------------------------------------------------------------


def test_record_dropped_delivery_only_adds_an_event(db: Store) -> None:
    for state in (S.RUNNING, S.SUCCEEDED):
        with case(state):
            job = in_state(db, state)
            jobs_before, events_before = db.snapshot()

            db(store.record_dropped_delivery, job, worker=OTHER_WORKER, reason="dup", now=at(8))

            jobs_after, events_after = db.snapshot()
            assert jobs_after == jobs_before
            assert events_after[: len(events_before)] == events_before
            assert len(events_after) == len(events_before) + 1
            event = db.events(job.id)[-1]
            assert event.event == "delivery_dropped"
            assert event.from_state == event.to_state == state
            assert (event.worker, event.detail) == (OTHER_WORKER, {"reason": "dup"})
            assert (event.at, event.attempt) == (at(8), job.attempts)


# --- reads ----------------------------------------------------------------------------------


def test_get_job_is_scoped_to_the_tenant(db: Store) -> None:
    job = in_state(db, S.QUEUED)
    assert db(store.get_job, job.id) == job
    assert db(store.get_job, job.id, tenant=TENANT) == job
    assert db(store.get_job, job.id, tenant="globex") is None
    assert db(store.get_job, uuid.uuid4()) is None


def test_find_by_idempotency_key(db: Store) -> None:
    mine = db(store.create_job, new_job(idempotency_key="order-1"), now=T0)
    theirs = db(store.create_job, new_job(tenant="globex", idempotency_key="order-1"), now=T0)
    db(store.create_job, new_job(), now=T0)  # no key at all

    assert db(store.find_by_idempotency_key, TENANT, "order-1") == mine
    assert db(store.find_by_idempotency_key, "globex", "order-1") == theirs
    assert db(store.find_by_idempotency_key, TENANT, "order-2") is None
    assert db(store.find_by_idempotency_key, "initech", "order-1") is None


def test_list_events_is_the_history_oldest_first(db: Store) -> None:
    job = db(store.create_job, new_job(run_at=at(10)), now=T0)
    db(store.promote, job.id, now=at(10))
    db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(11))
    db(
        store.fail_retry,
        job.id,
        worker=WORKER,
        token=1,
        error=ERROR,
        delay_seconds=3,
        now=at(12),
    )
    db(store.promote, job.id, now=at(15))
    db(store.claim, job.id, worker=WORKER, lease_seconds=30, now=at(16))
    db(store.release, job.id, worker=WORKER, token=2, reason="shutdown", now=at(17))
    claimed = db(store.claim, job.id, worker=OTHER_WORKER, lease_seconds=30, now=at(18))
    db(store.record_dropped_delivery, claimed, worker=WORKER, reason="dup", now=at(19))
    db(store.dead, job.id, worker=OTHER_WORKER, token=3, error=ERROR, now=at(20))
    db(store.requeue, job.id, now=at(21))
    db(store.cancel, job.id, now=at(22))
    # Another job's history stays out of this one.
    other = in_state(db, S.SUCCEEDED)

    events = db.events(job.id)
    assert [e.event for e in events] == [
        "created",
        "promoted",
        "claimed",
        "failed",
        "promoted",
        "claimed",
        "released",
        "claimed",
        "delivery_dropped",
        "dead",
        "requeued",
        "cancelled",
    ]
    assert [e.attempt for e in events] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 0]
    assert [e.at for e in events] == [
        at(s) for s in (0, 10, 11, 12, 15, 16, 17, 18, 19, 20, 21, 22)
    ]
    assert all(e.job_id == job.id for e in events)
    assert_history_follows_table(events)
    assert_history_follows_table(db.events(other.id))
    assert [e.event for e in db.events(other.id)] == ["created", "claimed", "succeeded"]
    assert db.events(uuid.uuid4()) == []


def test_list_jobs_newest_first_with_filters(db: Store) -> None:
    a = db(store.create_job, new_job(), now=at(1))
    b = db(store.create_job, new_job(tenant="globex"), now=at(2))
    c = db(store.create_job, new_job(run_at=at(100)), now=at(3))
    d = db(store.create_job, new_job(), now=at(4))
    # Two jobs created at the same instant come in descending id order.
    e, f = db(store.create_jobs, [new_job(), new_job()], now=at(5))
    same_instant = sorted([e, f], key=lambda j: j.id, reverse=True)

    everything = db(store.list_jobs)
    assert [j.id for j in everything] == [*(j.id for j in same_instant), d.id, c.id, b.id, a.id]
    assert [j.id for j in db(store.list_jobs, tenant="globex")] == [b.id]
    acme_queued = db(store.list_jobs, tenant=TENANT, state=S.QUEUED)
    assert [j.id for j in acme_queued] == [*(j.id for j in same_instant), d.id, a.id]
    assert [j.id for j in db(store.list_jobs, state=S.SCHEDULED)] == [c.id]
    assert [j.id for j in db(store.list_jobs, limit=2)] == [j.id for j in same_instant]
    assert db(store.list_jobs, tenant="initech") == []


# --- due_for_publish ------------------------------------------------------------------------


def test_due_for_publish_covers_each_branch(db: Store) -> None:
    now, cutoff = at(1000), at(990)

    def make(created: float, **overrides: Any) -> Job:
        job: Job = db(store.create_job, new_job(**overrides), now=at(created))
        return job

    # Branch 1: queued and never published since before the cutoff.
    stale_queued = make(900)
    # Not branch 1: published, or still within the grace period.
    published_queued = make(900)
    db(store.mark_published, [published_queued.id], now=at(901))
    fresh_queued = make(995)

    # Branch 2: waiting, due, never published with a countdown.
    due_scheduled = make(500, run_at=at(998))
    # Not branch 2: published with a countdown and due only within the grace period.
    due_published_recently = make(500, run_at=at(998))
    db(store.mark_published, [due_published_recently.id], now=at(501))
    # Not due yet, published or not.
    future_scheduled = make(500, run_at=at(2000))

    # Branch 3: waiting and overdue past the cutoff, even though a countdown was published.
    overdue_published = make(400, run_at=at(980))
    db(store.mark_published, [overdue_published.id], now=at(401))

    # Retrying is waiting too: due and unpublished (branch 2).
    retrying = in_state(db, S.RETRYING)  # run_after = at(12), never published
    # Jobs in other states never need publishing.
    for state in (S.RUNNING, S.SUCCEEDED, S.DEAD, S.CANCELLED):
        in_state(db, state)

    due = db(store.due_for_publish, cutoff=cutoff, now=now)
    assert {j.id for j in due} == {
        stale_queued.id,
        due_scheduled.id,
        overdue_published.id,
        retrying.id,
    }
    assert [j.updated_at for j in due] == sorted(j.updated_at for j in due)
    excluded = {
        published_queued.id,
        fresh_queued.id,
        due_published_recently.id,
        future_scheduled.id,
    }
    assert not excluded & {j.id for j in due}

    assert len(db(store.due_for_publish, cutoff=cutoff, now=now, limit=2)) == 2


def test_due_for_publish_branch_one_alone(db: Store) -> None:
    job = db(store.create_job, new_job(), now=at(0))
    assert db(store.due_for_publish, cutoff=at(0), now=at(100)) == []  # not strictly before
    assert [j.id for j in db(store.due_for_publish, cutoff=at(1), now=at(100))] == [job.id]


def test_due_for_publish_branch_two_alone(db: Store) -> None:
    job = db(store.create_job, new_job(run_at=at(50)), now=at(0))
    assert db(store.due_for_publish, cutoff=at(0), now=at(49)) == []
    assert [j.id for j in db(store.due_for_publish, cutoff=at(0), now=at(50))] == [job.id]


def test_due_for_publish_branch_three_alone(db: Store) -> None:
    job = db(store.create_job, new_job(run_at=at(50)), now=at(0))
    db(store.mark_published, [job.id], now=at(0))
    assert db(store.due_for_publish, cutoff=at(49), now=at(60)) == []
    assert [j.id for j in db(store.due_for_publish, cutoff=at(50), now=at(60))] == [job.id]


def test_due_for_publish_negative(db: Store) -> None:
    queued = db(store.create_job, new_job(), now=at(0))
    db(store.mark_published, [queued.id], now=at(0))
    db(store.create_job, new_job(run_at=at(500)), now=at(0))
    for state in (S.RUNNING, S.SUCCEEDED, S.DEAD, S.CANCELLED):
        in_state(db, state)
    assert db(store.due_for_publish, cutoff=at(100), now=at(200)) == []


# --- CHECK constraints ----------------------------------------------------------------------


def _row(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "tenant": TENANT,
        "task": "demo.echo",
        "state": "queued",
        "priority": "default",
        "queue": "default",
        "payload": {},
        "attempts": 0,
        "max_attempts": 3,
        "timeout_seconds": 60.0,
        "tags": [],
        "cancel_requested": False,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(overrides)
    return values


def test_a_valid_direct_insert_is_accepted(db: Store) -> None:
    """The control for the constraint tests below: the base row itself is fine."""
    row = _row(state="succeeded", finished_at=T0)
    db.execute_raw(insert(jobs), row)
    assert db.job(row["id"]).state is S.SUCCEEDED


IMPOSSIBLE_ROWS = {
    "unknown state": {"state": "paused"},
    "unknown priority": {"priority": "urgent"},
    "terminal without finished_at": {"state": "succeeded"},
    "dead without finished_at": {"state": "dead"},
    "finished_at while queued": {"finished_at": T0},
    "running without worker": {"state": "running", "attempts": 1},
    "scheduled without run_after": {"state": "scheduled"},
    "retrying without run_after": {"state": "retrying", "attempts": 1},
    "attempts above max": {"attempts": 4},
    "negative attempts": {"attempts": -1},
    "max_attempts zero": {"max_attempts": 0, "attempts": 0},
    "no tenant": {"tenant": None},
}


def test_impossible_inserts_are_rejected(db: Store) -> None:
    before = db.snapshot()
    for name, values in IMPOSSIBLE_ROWS.items():
        with case(name):
            with pytest.raises(IntegrityError):
                db.execute_raw(insert(jobs), _row(**values))
            assert db.snapshot() == before


def test_impossible_updates_are_rejected(db: Store) -> None:
    job = in_state(db, S.QUEUED)
    before = db.snapshot()
    for name, values in IMPOSSIBLE_ROWS.items():
        with case(name):
            with pytest.raises(IntegrityError):
                db.execute_raw(update(jobs).where(jobs.c.id == job.id).values(**values))
            assert db.snapshot() == before


def test_running_job_cannot_lose_its_worker(db: Store) -> None:
    job = in_state(db, S.RUNNING)
    with pytest.raises(IntegrityError):
        db.execute_raw(update(jobs).where(jobs.c.id == job.id).values(worker=None))
    assert db.job(job.id).worker == WORKER


def test_finished_job_cannot_lose_its_finish_time(db: Store) -> None:
    job = in_state(db, S.SUCCEEDED)
    with pytest.raises(IntegrityError):
        db.execute_raw(update(jobs).where(jobs.c.id == job.id).values(finished_at=None))
    assert db.job(job.id).finished_at == at(2)


def test_event_for_a_missing_job_is_rejected(db: Store) -> None:
    before = db.snapshot()
    with pytest.raises(IntegrityError):
        db.execute_raw(
            insert(job_events),
            {
                "job_id": uuid.uuid4(),
                "at": T0,
                "event": "created",
                "from_state": None,
                "to_state": "queued",
                "attempt": 0,
            },
        )
    assert db.snapshot() == before


def test_naive_timestamps_are_refused(db: Store) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        db(store.create_job, new_job(), now=dt.datetime(2031, 1, 1))
    assert db.snapshot() == ([], [])


# --- API keys -------------------------------------------------------------------------------


def _key_rows(db: Store) -> list[dict[str, Any]]:
    with db.sessions() as session:
        return [dict(r) for r in session.execute(select(api_keys)).mappings()]


def test_create_key_and_find_it(db: Store) -> None:
    key, record = db(keys.create_key, tenant=TENANT, scopes=("submit", "read"))

    assert key.startswith(keys.KEY_PREFIX)
    assert len(key) > 40
    assert record.tenant == TENANT
    assert record.scopes == frozenset({"submit", "read"})
    assert record.prefix == key[:12]
    assert record.revoked is False

    found = db(keys.find_key, key)
    assert found == record
    assert db(keys.find_key, key + "x") is None
    assert db(keys.find_key, "cvk_" + "A" * 43) is None


def test_create_key_defaults_to_every_scope(db: Store) -> None:
    key, record = db(keys.create_key, tenant=TENANT)
    assert record.scopes == frozenset(keys.SCOPES)
    assert db(keys.find_key, key).scopes == frozenset({"submit", "read", "admin"})


def test_stored_key_row_holds_only_the_hash(db: Store) -> None:
    key, record = db(keys.create_key, tenant=TENANT, scopes=("read",))
    [row] = _key_rows(db)

    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["id"] == record.id
    assert row["scopes"] == ["read"]
    assert row["revoked_at"] is None
    for column, value in row.items():
        assert key not in str(value), column
    # The displayed prefix is a short, non-secret part of the key.
    assert len(row["prefix"]) == 12


def test_revoke_key(db: Store) -> None:
    key, record = db(keys.create_key, tenant=TENANT)
    other_key, other = db(keys.create_key, tenant="globex")

    assert db(keys.revoke_key, record.id) is True
    assert db(keys.find_key, key) is None
    assert db(keys.revoke_key, record.id) is False  # already revoked
    assert db(keys.revoke_key, uuid.uuid4()) is False
    assert db(keys.find_key, other_key) == other
    [revoked] = [r for r in _key_rows(db) if r["id"] == record.id]
    assert revoked["revoked_at"] is not None


def test_unknown_scope_or_bad_tenant_raises_and_writes_nothing(db: Store) -> None:
    for scopes in [("root",), ("read", "superuser")]:
        with case(scopes), pytest.raises(ValueError, match="unknown scope"):
            db(keys.create_key, tenant=TENANT, scopes=scopes)
    for tenant in ["", "t" * 101]:
        with case(tenant), pytest.raises(ValueError, match="tenant"):
            db(keys.create_key, tenant=tenant)
    assert _key_rows(db) == []


def test_key_hash_is_unique(db: Store) -> None:
    db(keys.create_key, tenant=TENANT)
    [row] = _key_rows(db)
    with pytest.raises(IntegrityError):
        db.execute_raw(insert(api_keys), {**row, "id": uuid.uuid4()})
    with db.sessions() as session:
        assert session.execute(select(func.count()).select_from(api_keys)).scalar_one() == 1
