"""The slow claim path on both databases: its result for each row state, and its reads."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from conveyor.config import TaskLimits
from conveyor.jobs import store
from conveyor.jobs.models import Job
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import jobs
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker.claiming import Claim, Claimer, ClaimKind
from conveyor.worker.limiter import StoreLimiter

LIMITED = {"demo.echo": TaskLimits(key="payload.n", concurrency=1)}


class Reads:
    """Counts the claimer's own reads of a job row."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._read = store.get_job
        monkeypatch.setattr(store, "get_job", self._counted)

    def _counted(self, session: Session, job_id: uuid.UUID, **kwargs: Any) -> Job | None:
        self.count += 1
        return self._read(session, job_id, **kwargs)


def claimer(limits: dict[str, TaskLimits], rate_horizon: float = 0.5) -> Claimer:
    return Claimer(
        lease_seconds=30, limits=limits, limiter=StoreLimiter(), rate_horizon=rate_horizon
    )


def counted_claim(
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    job_id: uuid.UUID,
    by: Claimer,
) -> tuple[Claim, int]:
    """The claim of one delivery by `by`, and how many times it read the job's row."""
    with monkeypatch.context() as patched:
        reads = Reads(patched)
        taken = by.claim(sessions, job_id, "here")
    return taken, reads.count


def submit(sessions: sessionmaker[Session], n: int = 1, **options: Any) -> Job:
    new = build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n}, **options)
    with sessions.begin() as session:
        return store.create_job(session, new)


def claim(sessions: sessionmaker[Session], job: Job, lease_seconds: float = 30) -> Job:
    with sessions.begin() as session:
        claimed = store.claim(session, job.id, worker="elsewhere", lease_seconds=lease_seconds)
    assert claimed is not None
    return claimed


def set_row(sessions: sessionmaker[Session], job: Job, **values: Any) -> None:
    """Set columns of the job's row; a timedelta is taken from the database's now."""
    with sessions.begin() as session:
        now = store.database_now(session)
        values = {k: now + v if isinstance(v, dt.timedelta) else v for k, v in values.items()}
        session.execute(update(jobs).where(jobs.c.id == job.id).values(**values))


def row(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with sessions() as session:
        found = store.get_job(session, job_id)
    assert found is not None
    return found


def events(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[str]:
    with sessions() as session:
        return [event.event for event in store.list_events(session, job_id)]


@pytest.mark.parametrize("limits", [{}, LIMITED], ids=["unlimited", "limited"])
def test_a_queued_job_is_claimed_with_at_most_one_read(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, limits: Any
) -> None:
    job = submit(sessions)
    taken, reads = counted_claim(sessions, monkeypatch, job.id, claimer(limits))
    assert taken.kind is ClaimKind.CLAIMED
    assert taken.job.state is JobState.RUNNING and taken.job.worker == "here"
    assert reads == (1 if limits else 0)
    if limits:
        assert row(sessions, job.id).limit_key == "1"


def test_a_job_over_its_concurrency_is_deferred_after_one_read(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_row(sessions, claim(sessions, submit(sessions)), limit_key="1")
    second = submit(sessions)
    taken, reads = counted_claim(sessions, monkeypatch, second.id, claimer(LIMITED))
    assert taken.kind is ClaimKind.DEFERRED
    assert taken.outcome().action == "deferred"
    assert reads == 1
    assert row(sessions, second.id).state is JobState.SCHEDULED


@pytest.mark.parametrize("limits", [{}, LIMITED], ids=["unlimited", "limited"])
def test_an_expired_run_is_rescued_and_claimed_after_one_read(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, limits: Any
) -> None:
    job = claim(sessions, submit(sessions))
    set_row(sessions, job, lease_expires_at=-dt.timedelta(seconds=5))
    taken, reads = counted_claim(sessions, monkeypatch, job.id, claimer(limits))
    assert taken.kind is ClaimKind.CLAIMED
    assert taken.job.attempts == 2 and taken.job.lease_token == job.lease_token + 1
    assert reads == 1
    assert events(sessions, job.id)[-2:] == ["rescued", "claimed"]


def test_a_due_wait_is_promoted_and_claimed_after_one_read(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = submit(sessions, delay_seconds=60)
    set_row(sessions, job, run_after=-dt.timedelta(seconds=1))
    taken, reads = counted_claim(sessions, monkeypatch, job.id, claimer(LIMITED))
    assert taken.kind is ClaimKind.CLAIMED
    assert reads == 1
    assert events(sessions, job.id)[-2:] == ["promoted", "claimed"]


@pytest.mark.parametrize("limits", [{}, LIMITED], ids=["unlimited", "limited"])
def test_a_duplicate_delivery_is_dropped_and_recorded_after_one_read(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, limits: Any
) -> None:
    job = claim(sessions, submit(sessions))
    taken, reads = counted_claim(sessions, monkeypatch, job.id, claimer(limits))
    assert taken == Claim.dropped(job.id, JobState.RUNNING)
    assert taken.outcome().action == "dropped"
    assert reads == 1
    assert events(sessions, job.id)[-1] == "delivery_dropped"
    assert row(sessions, job.id).lease_token == job.lease_token


def test_a_run_rescued_with_no_attempts_left_is_dead_and_the_delivery_dropped(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = claim(sessions, submit(sessions, max_attempts=1))
    set_row(sessions, job, lease_expires_at=-dt.timedelta(seconds=5))
    taken, reads = counted_claim(sessions, monkeypatch, job.id, claimer(LIMITED))
    assert taken == Claim.dropped(job.id, JobState.DEAD)
    assert reads == 1
    assert events(sessions, job.id)[-1] == "delivery_dropped"


@pytest.mark.parametrize("limits", [{}, LIMITED], ids=["unlimited", "limited"])
def test_a_queued_job_with_no_attempts_left_ends_dead(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, limits: Any
) -> None:
    job = submit(sessions, max_attempts=1)
    set_row(sessions, job, attempts=1)
    taken, reads = counted_claim(sessions, monkeypatch, job.id, claimer(limits))
    assert taken.kind is ClaimKind.EXHAUSTED
    assert taken.outcome().action == "ran-dead"
    assert reads == 1
    assert row(sessions, job.id).state is JobState.DEAD


def test_a_missing_job_is_dropped(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = uuid.uuid4()
    taken, reads = counted_claim(sessions, monkeypatch, missing, claimer(LIMITED))
    assert taken == Claim.dropped(missing, None)
    assert reads == 1


def test_a_held_slot_is_waited_for_and_the_row_not_read_again(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    rated = claimer({"demo.echo": TaskLimits(rate=5)}, rate_horizon=1.0)
    assert rated.claim(sessions, submit(sessions).id, "here").kind is ClaimKind.CLAIMED
    second = submit(sessions, 2)
    began = time.monotonic()
    taken, reads = counted_claim(sessions, monkeypatch, second.id, rated)
    # Five starts a second: the second start waits for its slot, 0.2 s after the first.
    assert time.monotonic() - began >= 0.1
    assert taken.kind is ClaimKind.CLAIMED
    assert reads == 1


def test_a_claim_that_did_not_run_a_job_holds_none() -> None:
    dropped = Claim.dropped(uuid.uuid4(), JobState.SUCCEEDED)
    with pytest.raises(ValueError):
        _ = dropped.job
    assert Claim.exhausted(dropped.job_id).outcome().state is JobState.DEAD
