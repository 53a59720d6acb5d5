"""Rate-limit slots in Redis and in the job store, and the executor's waits and deferrals."""

from __future__ import annotations

import datetime as dt
import itertools
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.config import TaskLimits
from conveyor.jobs import store
from conveyor.jobs.tables import jobs
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job
from conveyor.worker.execute import Executor
from conveyor.worker.leases import LeaseKeeper
from conveyor.worker.limiter import Limiter, RedisLimiter, StoreLimiter


@pytest.fixture(params=["redis", "store"])
def limiter(request: pytest.FixtureRequest) -> Limiter:
    if request.param == "redis":
        return RedisLimiter(request.getfixturevalue("redis_url"))
    return StoreLimiter()


def test_slots_are_spaced_and_only_taken_within_the_horizon(
    limiter: Limiter, sessions: sessionmaker[Session]
) -> None:
    # A second per slot: the six calls may take a while on a busy machine without
    # moving any slot into or out of the horizon (3.5 s: the fifth slot is 4 s away).
    interval, horizon = 1.0, 3.5
    before = dt.datetime.now(dt.UTC)
    with sessions.begin() as session:
        answers = [limiter.reserve(session, "demo.echo", interval, horizon) for _ in range(6)]
    assert [a.taken for a in answers] == [True, True, True, True, False, False]
    slots = [a.at for a in answers[:4]]
    assert slots[0] >= before - dt.timedelta(milliseconds=50)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(slots)]
    assert all(abs(gap - interval) < 1e-3 for gap in gaps)
    # Refused: ask again when the next free slot comes within the horizon.
    next_free = slots[3] + dt.timedelta(seconds=interval)
    expected = next_free - dt.timedelta(seconds=horizon)
    assert abs((answers[4].at - expected).total_seconds()) < 1e-3
    with sessions.begin() as session:
        other = limiter.reserve(session, "demo.sleep", interval, horizon)
    assert other.taken


def executor(
    sessions: sessionmaker[Session], limiter: Limiter, limits: dict[str, TaskLimits]
) -> Executor:
    return Executor(
        sessions=lambda: sessions,
        registry=registry,
        worker=lambda: "test-worker",
        lease_seconds=30,
        reschedule=lambda job: None,
        leases=LeaseKeeper(
            sessions=lambda: sessions, worker=lambda: "test-worker", lease_seconds=30, interval=1
        ),
        limits=limits,
        limiter=limiter,
        rate_horizon=0.5,
    )


def submit(sessions: sessionmaker[Session], count: int) -> list[store.Job]:
    new = [
        build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n})
        for n in range(count)
    ]
    with sessions.begin() as session:
        return store.create_jobs(session, new)


def test_a_worker_waits_for_its_slot_then_starts(
    limiter: Limiter, sessions: sessionmaker[Session]
) -> None:
    run = executor(sessions, limiter, {"demo.echo": TaskLimits(rate=10)})
    created = submit(sessions, 4)
    began = time.monotonic()
    outcomes = [run.run(job.id) for job in created]
    elapsed = time.monotonic() - began
    assert [o.action for o in outcomes] == ["ran-succeeded"] * 4
    with sessions() as session:
        starts = sorted(t for (t,) in session.execute(select(jobs.c.started_at)).all())
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    # Four starts at 10 per second: 0.3 s from the first to the last. A recorded start
    # is the claim's commit time, a few milliseconds after its slot.
    assert all(gap >= 0.08 for gap in gaps), gaps
    assert (starts[-1] - starts[0]).total_seconds() >= 0.29
    assert elapsed >= 0.29


def test_a_job_with_no_slot_near_is_deferred_without_using_an_attempt(
    limiter: Limiter, sessions: sessionmaker[Session]
) -> None:
    run = executor(sessions, limiter, {"demo.echo": TaskLimits(rate=0.5)})
    first, second = submit(sessions, 2)
    assert run.run(first.id).action == "ran-succeeded"
    # The next slot is two seconds away, well beyond the half-second horizon.
    outcome = run.run(second.id)
    assert outcome.action == "deferred"
    with sessions() as session:
        job = store.get_job(session, second.id)
        counts = store.counts_by_queue(session)
    assert job is not None
    assert job.state.value == "scheduled" and job.attempts == 0
    assert job.slot_at is not None and job.run_after is not None
    assert counts["default"]["rate_limited"] == 1
    # Once due, the job is delivered again and takes its slot.
    wait = (job.run_after - store.utcnow()).total_seconds()
    time.sleep(max(0.0, wait))
    assert run.run(second.id).action == "ran-succeeded"


def test_a_per_key_rate_spaces_each_key_and_not_the_others(
    limiter: Limiter, sessions: sessionmaker[Session]
) -> None:
    run = executor(
        sessions, limiter, {"demo.echo": TaskLimits(key="payload.customer", key_rate=10)}
    )
    new = [
        build_new_job(registry, tenant="acme", task="demo.echo", payload={"customer": c})
        for c in ("a", "b", "a", "b")
    ]
    with sessions.begin() as session:
        created = store.create_jobs(session, new)
    assert [run.run(job.id).action for job in created] == ["ran-succeeded"] * 4
    with sessions() as session:
        rows = session.execute(select(jobs.c.payload, jobs.c.started_at)).all()
    starts = {
        customer: sorted(t for p, t in rows if p["customer"] == customer) for customer in "ab"
    }
    for customer, (first, second) in starts.items():
        assert (second - first).total_seconds() >= 0.08, customer
    # b's first job took its own key's slot at once, without waiting behind a's.
    assert (starts["b"][0] - starts["a"][0]).total_seconds() < 0.08
