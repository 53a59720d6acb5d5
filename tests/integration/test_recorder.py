"""The recorder writes the same rows as the store, for one job and for many, on PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from conveyor.jobs import store
from conveyor.jobs.db import make_session_factory, recorder_for
from conveyor.jobs.models import Job, NewJob
from conveyor.jobs.states import JobState
from conveyor.jobs.tables import job_events
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

# What the database fills in and so differs between any two recordings.
_OWN = {
    "id",
    "tenant",
    "created_at",
    "scheduled_at",
    "updated_at",
    "run_after",
    "traceparent",
}


def _shape(job: Job) -> dict[str, Any]:
    return {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in _OWN}


CASES = {
    "plain": {},
    "later": {"run_at": dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)},
    "past": {"run_at": dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)},
    "keyed": {"idempotency_key": "k-1", "request_hash": "h" * 64, "tags": ["a", "b"]},
    "scheduled": {"schedule_tick": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)},
}


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_rows_match_the_stores(pg_engine: Engine, case: str, count: int) -> None:
    sessions = make_session_factory(pg_engine)
    extra = CASES[case]

    def batch(tenant: str) -> list[NewJob]:
        given = {k: v for k, v in extra.items() if k != "schedule_tick"}
        made = [
            build_new_job(registry, tenant=tenant, task="demo.echo", payload={"n": n}, **given)
            for n in range(count)
        ]
        if (tick := extra.get("schedule_tick")) is not None:
            # A schedule's tick is recorded once; each job gets a schedule of its own.
            made = [
                dataclasses.replace(new, schedule_id=uuid.uuid4(), schedule_tick=tick)
                for new in made
            ]
        return made[: 1 if extra.get("idempotency_key") else count]

    recorded = recorder_for(sessions).record(batch("acme"))
    with sessions.begin() as session:
        expected = store.create_jobs(session, batch("other"))
    assert len(recorded) == len(expected)
    for got, want in zip(recorded, expected, strict=True):
        assert _shape(got) == _shape(want)
        assert got.tenant == "acme"
        assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == dt.timedelta(0)
        if "run_at" in extra and got.state is JobState.SCHEDULED:
            assert got.run_after == extra["run_at"]
    with sessions() as session:
        events = session.execute(select(func.count()).select_from(job_events)).scalar_one()
        # The jobs handed back are built from what was given; they are what was stored.
        for job in [*recorded, *expected]:
            assert store.get_job(session, job.id) == job
    assert events == 2 * len(recorded)


def test_marks_of_publication_stamp_only_the_unstamped(store_engine: Engine) -> None:
    sessions = make_session_factory(store_engine)
    recorder = recorder_for(sessions)
    jobs = recorder.record(
        [build_new_job(registry, tenant="acme", task="demo.echo", payload={}) for _ in range(3)]
    )
    first, second, untouched = (job.id for job in jobs)
    recorder.mark_published([first])
    with sessions() as session:
        stamped = store.get_job(session, first)
    assert stamped is not None and stamped.published_at is not None
    recorder.mark_published([first, second, uuid.uuid4()])  # an unknown id is no error
    recorder.mark_published([])
    with sessions() as session:
        after = {job.id: store.get_job(session, job.id) for job in jobs}
    assert after[first] == stamped  # its stamp is kept
    second_job, untouched_job = after[second], after[untouched]
    assert second_job is not None and second_job.published_at is not None
    assert untouched_job is not None and untouched_job.published_at is None
