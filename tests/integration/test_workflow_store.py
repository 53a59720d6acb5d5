"""Workflows in the store, on SQLite and PostgreSQL: steps released in their parents'
transitions, cancelled as upstream_failed, resumed by a retry."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conveyor.jobs import store
from conveyor.jobs.models import Job, JobError
from conveyor.jobs.store import workflows as flows
from conveyor.jobs.tables import job_events
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

WORKER = "w1"


def step(key: str, *after: str, run_if: str = "succeeded", n: int = 0) -> flows.NewStep:
    new = build_new_job(registry, tenant="acme", task="demo.echo", payload={"n": n})
    return flows.NewStep(key, new, tuple(after), run_if)


def submit(sessions: sessionmaker[Session], *steps: flows.NewStep) -> dict[str, Job]:
    with sessions.begin() as session:
        _, jobs = flows.create_workflow(
            session, tenant="acme", name="w", tags=[], steps=list(steps)
        )
    return {s.key: j for s, j in zip(steps, jobs, strict=True)}


def states(sessions: sessionmaker[Session], jobs: dict[str, Job]) -> dict[str, str]:
    with sessions() as session:
        return {
            key: store.get_job(session, job.id).state.value  # type: ignore[union-attr]
            for key, job in jobs.items()
        }


def workflow_of(sessions: sessionmaker[Session], job: Job) -> flows.Workflow:
    with sessions() as session:
        found = store.get_job(session, job.id)
        assert found is not None and found.workflow_id is not None
        workflow = flows.get_workflow(session, found.workflow_id, steps=True)
    assert workflow is not None
    return workflow


def run(sessions: sessionmaker[Session], job: Job, result: Any = None, fail: bool = False) -> None:
    with sessions.begin() as session:
        claimed = store.claim(session, job.id, worker=WORKER, lease_seconds=30)
        assert claimed is not None, f"could not claim {job.step}"
        if fail:
            store.dead(
                session,
                job.id,
                worker=WORKER,
                token=claimed.lease_token,
                error=JobError("Boom", "it broke"),
            )
        else:
            store.succeed(session, job.id, worker=WORKER, token=claimed.lease_token, result=result)


def test_a_chain_releases_each_step_in_its_parents_transition(
    sessions: sessionmaker[Session],
) -> None:
    jobs = submit(sessions, step("a"), step("b", "a"), step("c", "b"))
    assert states(sessions, jobs) == {"a": "queued", "b": "pending", "c": "pending"}
    run(sessions, jobs["a"], {"a": 1})
    assert states(sessions, jobs) == {"a": "succeeded", "b": "queued", "c": "pending"}
    with sessions() as session:
        assert flows.released_after(session, [jobs["a"].id])[0].id == jobs["b"].id
        assert flows.parent_results(session, jobs["b"].id) == {"a": {"a": 1}}
        events = session.execute(
            select(job_events.c.event, job_events.c.from_state, job_events.c.to_state).where(
                job_events.c.job_id == jobs["b"].id
            )
        ).all()
    assert [tuple(e) for e in events] == [
        ("created", None, "pending"),
        ("released", "pending", "queued"),
    ]
    run(sessions, jobs["b"])
    assert workflow_of(sessions, jobs["a"]).state == "running"
    run(sessions, jobs["c"])
    workflow = workflow_of(sessions, jobs["a"])
    assert workflow.state == "succeeded" and workflow.finished_at is not None
    assert [s.key for s in workflow.steps] == ["a", "b", "c"]
    assert [s.after for s in workflow.steps] == [[], ["a"], ["b"]]


def test_a_fan_in_waits_for_every_parent(sessions: sessionmaker[Session]) -> None:
    parents = [step(f"p{i}", n=i) for i in range(5)]
    jobs = submit(sessions, *parents, step("join", *[p.key for p in parents]))
    for i in range(5):
        assert states(sessions, jobs)["join"] == "pending"
        run(sessions, jobs[f"p{i}"], i)
    assert states(sessions, jobs)["join"] == "queued"
    with sessions() as session:
        assert flows.parent_results(session, jobs["join"].id) == {f"p{i}": i for i in range(5)}


def test_a_failed_parent_cancels_its_dependents_and_a_retry_resumes_them(
    sessions: sessionmaker[Session],
) -> None:
    jobs = submit(
        sessions,
        step("a"),
        step("b", "a"),
        step("c", "b"),
        step("always", "a", run_if="finished"),
    )
    run(sessions, jobs["a"], fail=True)
    assert states(sessions, jobs) == {
        "a": "dead",
        "b": "cancelled",
        "c": "cancelled",
        "always": "queued",
    }
    with sessions() as session:
        cancelled = store.get_job(session, jobs["c"].id)
    assert cancelled is not None and cancelled.error_type == "upstream_failed"
    run(sessions, jobs["always"])
    workflow = workflow_of(sessions, jobs["a"])
    assert workflow.state == "failed" and workflow.finished
    # The dead step retried: its dependents wait for it again, the workflow runs again.
    with sessions.begin() as session:
        assert store.requeue(session, jobs["a"].id) is not None
    assert states(sessions, jobs) == {
        "a": "queued",
        "b": "pending",
        "c": "pending",
        "always": "succeeded",
    }
    assert workflow_of(sessions, jobs["a"]).state == "running"
    run(sessions, jobs["a"])
    assert states(sessions, jobs)["b"] == "queued"
    run(sessions, jobs["b"])
    run(sessions, jobs["c"])
    workflow = workflow_of(sessions, jobs["a"])
    assert workflow.state == "succeeded"
    assert (workflow.steps_left, workflow.steps_failed) == (0, 0)


def test_a_diamond_runs_its_join_once_after_both_sides(sessions: sessionmaker[Session]) -> None:
    jobs = submit(sessions, step("top"), step("l", "top"), step("r", "top"), step("j", "l", "r"))
    run(sessions, jobs["top"])
    assert states(sessions, jobs) == {
        "top": "succeeded",
        "l": "queued",
        "r": "queued",
        "j": "pending",
    }
    run(sessions, jobs["r"])
    assert states(sessions, jobs)["j"] == "pending"
    run(sessions, jobs["l"])
    assert states(sessions, jobs)["j"] == "queued"


def test_cancelling_a_workflow_cancels_every_unfinished_step(
    sessions: sessionmaker[Session],
) -> None:
    jobs = submit(
        sessions, step("a"), step("b"), step("c", "a", "b"), step("d", "c", run_if="finished")
    )
    run(sessions, jobs["a"])
    with sessions.begin() as session:
        claimed = store.claim(session, jobs["b"].id, worker=WORKER, lease_seconds=30)
        assert claimed is not None
    with sessions.begin() as session:
        workflow = flows.cancel_workflow(session, workflow_of(sessions, jobs["a"]).id)
    assert workflow is not None and workflow.state == "cancelled"
    assert states(sessions, jobs) == {
        "a": "succeeded",
        "b": "cancelled",
        "c": "cancelled",
        "d": "cancelled",
    }
    with sessions() as session:
        running = store.get_job(session, jobs["b"].id)
    assert running is not None and running.cancel_requested  # its run is told to stop
    assert workflow_of(sessions, jobs["a"]).finished


def test_another_tenants_workflow_is_not_found(sessions: sessionmaker[Session]) -> None:
    jobs = submit(sessions, step("a"))
    workflow_id = workflow_of(sessions, jobs["a"]).id
    with sessions() as session:
        assert flows.get_workflow(session, workflow_id, tenant="other") is None
        assert flows.get_workflow(session, uuid.uuid4()) is None
        assert flows.get_workflow(session, workflow_id, tenant="acme") is not None
        count = session.execute(select(func.count()).select_from(job_events)).scalar_one()
    assert count == 1
