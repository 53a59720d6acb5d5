"""Single submissions that arrive together share one transaction, one publish and one mark."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import psycopg
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs.db import make_session_factory
from conveyor.jobs.group_commit import GroupCommitter, Recorded
from conveyor.jobs.models import Job
from conveyor.jobs.tables import job_events, jobs
from conveyor.worker.broker import queue_depths
from conveyor.worker.publisher import CeleryPublisher
from tests.integration.test_batch_submit import app_for, new_jobs

DEADLINE = 10.0


class Gate:
    """A real publisher whose first publish waits until the test opens the gate."""

    def __init__(self, publisher: CeleryPublisher) -> None:
        self.publisher = publisher
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls: list[int] = []

    def publish(self, batch: Sequence[Job]) -> list[uuid.UUID]:
        self.calls.append(len(batch))
        self.entered.set()
        assert self.opened.wait(DEADLINE)
        return self.publisher.publish(batch)


def settle_all(committer: GroupCommitter, count: int) -> tuple[list[Recorded], threading.Event]:
    answers: list[Recorded] = []
    done = threading.Event()
    lock = threading.Lock()

    def settle(outcome: list[Recorded] | BaseException) -> None:
        assert isinstance(outcome, list), outcome
        with lock:
            answers.extend(outcome)
            if len(answers) == count:
                done.set()

    for new in new_jobs(count):
        committer.put([new], settle)
    return answers, done


def published_marks(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        query = select(func.count()).select_from(jobs).where(jobs.c.published_at.is_not(None))
        return int(session.execute(query).scalar_one())


def test_submissions_waiting_on_a_commit_form_the_next_batch(
    pg_engine: Engine, redis_url: str
) -> None:
    sessions = make_session_factory(pg_engine)
    app = app_for(redis_url)
    gate = Gate(CeleryPublisher(app))
    committer = GroupCommitter(sessions, gate, mark_delay=0.05)
    try:
        first, first_done = settle_all(committer, 1)
        assert gate.entered.wait(DEADLINE)
        # While the first job is being published, thirty more arrive.
        rest, rest_done = settle_all(committer, 30)
        gate.opened.set()
        assert first_done.wait(DEADLINE) and rest_done.wait(DEADLINE)
        assert committer.batches == 2
        assert gate.calls == [1, 30]
        assert all(answer.published for answer in first + rest)
        # The marks of both batches follow in one UPDATE.
        deadline = time.monotonic() + DEADLINE
        while published_marks(sessions) < 31 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert published_marks(sessions) == 31
        assert queue_depths(app)["default"] == 31
        with sessions() as session:
            events = session.execute(select(func.count()).select_from(job_events)).scalar_one()
        assert events == 31
    finally:
        gate.opened.set()
        committer.close()


def test_closing_records_and_answers_what_waits(pg_engine: Engine, redis_url: str) -> None:
    sessions = make_session_factory(pg_engine)
    gate = Gate(CeleryPublisher(app_for(redis_url)))
    committer = GroupCommitter(sessions, gate, mark_delay=60.0)
    first, done = settle_all(committer, 1)
    assert gate.entered.wait(DEADLINE)
    more, more_done = settle_all(committer, 5)
    gate.opened.set()
    committer.close()
    assert done.is_set() and more_done.is_set()
    assert len(first) == 1 and len(more) == 5
    # Marks that would have waited a minute are written before the thread ends.
    assert published_marks(sessions) == 6


def test_a_batch_is_one_unit_recorded_whole_or_not_at_all(
    pg_engine: Engine, redis_url: str
) -> None:
    sessions = make_session_factory(pg_engine)
    app = app_for(redis_url)
    gate = Gate(CeleryPublisher(app))
    committer = GroupCommitter(sessions, gate, max_batch=40)
    outcomes: dict[str, list[Recorded] | BaseException] = {}
    settled = threading.Condition()

    def settle_as(name: str) -> Callable[[list[Recorded] | BaseException], None]:
        def settle(outcome: list[Recorded] | BaseException) -> None:
            with settled:
                outcomes[name] = outcome
                settled.notify_all()

        return settle

    try:
        committer.put(new_jobs(1), settle_as("first"))
        assert gate.entered.wait(DEADLINE)
        # While the first is published: a batch of 30, one job, a batch whose last job
        # repeats the batch's first id, and a batch over what is left of max_batch.
        good = new_jobs(30)
        bad = new_jobs(5)
        bad[-1] = dataclasses.replace(bad[-1], id=bad[0].id)
        committer.put(good, settle_as("good"))
        committer.put(new_jobs(1), settle_as("single"))
        committer.put(bad, settle_as("bad"))
        committer.put(new_jobs(20), settle_as("next"))
        gate.opened.set()
        with settled:
            assert settled.wait_for(lambda: len(outcomes) == 5, DEADLINE)
    finally:
        gate.opened.set()
        committer.close()

    assert isinstance(outcomes["bad"], psycopg.IntegrityError), outcomes["bad"]
    recorded = {name: o for name, o in outcomes.items() if isinstance(o, list)}
    assert {name: len(o) for name, o in recorded.items()} == {
        "first": 1, "good": 30, "single": 1, "next": 20,
    }  # fmt: skip
    assert [r.job.id for r in recorded["good"]] == [new.id for new in good]
    # The first alone; the good batch, the single and the bad one tried together (36 of
    # 40), then again unit by unit once the bad one failed; the last batch by itself.
    assert gate.calls == [1, 30, 1, 20]
    with sessions() as session:
        stored = session.execute(select(func.count()).select_from(jobs)).scalar_one()
        events = session.execute(select(func.count()).select_from(job_events)).scalar_one()
    assert stored == events == 52
