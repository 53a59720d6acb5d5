"""Single submissions that arrive together share one transaction, one publish and one mark."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

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

    def settle(outcome: Recorded | BaseException) -> None:
        assert isinstance(outcome, Recorded), outcome
        with lock:
            answers.append(outcome)
            if len(answers) == count:
                done.set()

    for new in new_jobs(count):
        committer.put(new, settle)
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
