"""conveyor.client against the real API (uvicorn on a port), store and broker."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid

import pytest
from sqlalchemy import Engine

from conveyor.client import (
    AsyncClient,
    Client,
    ConveyorError,
    Job,
    StepSpec,
    WaitTimeout,
    chain,
    group,
    step,
)
from conveyor.jobs import store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.models import JobError
from tests.integration.conftest import LiveApi


def _run(engine: Engine, job_id: uuid.UUID, *, result: object = None, dead: bool = False) -> None:
    """What a worker would do: claim the job, then record its success (or its death)."""
    with make_session_factory(engine).begin() as session:
        claimed = store.claim(session, job_id, worker="w:1", lease_seconds=30)
        assert claimed is not None
        if dead:
            error = JobError("tests.Boom", "boom", "Traceback ...", "f" * 16)
            store.dead(session, job_id, worker="w:1", token=claimed.lease_token, error=error)
        else:
            store.succeed(session, job_id, worker="w:1", token=claimed.lease_token, result=result)


def test_a_job_submitted_waited_for_and_read_back(live_api: LiveApi, pg_engine: Engine) -> None:
    with Client(live_api.url, live_api.key) as conveyor:
        job = conveyor.submit("demo.echo", {"n": 1}, tags=["client"], max_attempts=2)
        assert isinstance(job, Job) and isinstance(job.id, uuid.UUID)
        assert (job.state, job.task, job.tags, job.max_attempts) == (
            "queued",
            "demo.echo",
            ["client"],
            2,
        )
        assert job.created_at.tzinfo is not None and not job.finished
        with pytest.raises(WaitTimeout) as waited:
            conveyor.wait(job.id, timeout=0.3)
        assert waited.value.job.state == "queued"
        threading.Timer(0.3, _run, args=(pg_engine, job.id), kwargs={"result": {"n": 1}}).start()
        done = conveyor.wait(job.id, timeout=20)
        assert (done.state, done.result, done.finished) == ("succeeded", {"n": 1}, True)
        assert done.finished_at is not None and done.finished_at >= done.created_at
        assert conveyor.get(str(job.id)) == done


def test_idempotency_batches_and_scheduling(live_api: LiveApi) -> None:
    with Client(live_api.url, live_api.key) as conveyor:
        first = conveyor.submit("demo.echo", {"k": 1}, idempotency_key="order-7")
        again = conveyor.submit("demo.echo", {"k": 1}, idempotency_key="order-7")
        assert again.id == first.id and again.idempotency_key == "order-7"
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        batch = conveyor.submit_batch(
            [
                {"task": "demo.echo", "payload": {"n": 0}},
                {"task": "demo.sleep", "payload": {"seconds": 1}, "priority": "low"},
                {"task": "demo.echo", "run_at": later},
            ]
        )
        assert [j.task for j in batch] == ["demo.echo", "demo.sleep", "demo.echo"]
        assert [j.state for j in batch] == ["queued", "queued", "scheduled"]
        assert batch[1].queue == "low" and batch[2].payload == {}


def test_refusals_raise_the_problem(live_api: LiveApi) -> None:
    with Client(live_api.url, live_api.key) as conveyor:
        with pytest.raises(ConveyorError) as unknown:
            conveyor.submit("no.such.task", {})
        assert unknown.value.status == 422
        assert unknown.value.type.endswith("unknown-task")
        assert unknown.value.errors and unknown.value.errors[0]["loc"][-1] == "task"
        with pytest.raises(ConveyorError) as missing:
            conveyor.get(uuid.uuid4())
        assert missing.value.status == 404 and "no job" in missing.value.detail
        job = conveyor.submit("demo.echo", {})
        assert conveyor.cancel(job.id).state == "cancelled"
        with pytest.raises(ConveyorError) as finished:
            conveyor.cancel(job.id)
        assert finished.value.status == 409
        assert conveyor.retry(job.id).state == "queued"
    with Client(live_api.url, "not-a-key") as stranger, pytest.raises(ConveyorError) as refused:
        stranger.get(uuid.uuid4())
    assert refused.value.status == 401
    with pytest.raises(ValueError, match="API key"):
        Client(live_api.url, "")


def test_dead_letters_listed_and_replayed(live_api: LiveApi, pg_engine: Engine) -> None:
    with Client(live_api.url, live_api.key) as conveyor:
        job = conveyor.submit("demo.fail", {"failures": 1})
        _run(pg_engine, job.id, dead=True)
        dead = conveyor.wait(job.id, timeout=10)
        assert dead.state == "dead" and dead.error is not None
        assert (dead.error.type, dead.error.message) == ("tests.Boom", "boom")
        letters = conveyor.dead_letters(task="demo.fail")
        assert [j.id for j in letters.items] == [job.id]
        assert letters.groups[0].count == 1 and letters.groups[0].error_type == "tests.Boom"
        assert conveyor.replay_dead_letters([job.id]) == 1
        assert conveyor.get(job.id).state == "queued"
        assert conveyor.replay_dead_letters(task="demo.fail") == 0


def test_the_async_client(live_api: LiveApi, pg_engine: Engine) -> None:
    async def scenario() -> tuple[Job, Job, int]:
        async with AsyncClient(live_api.url, live_api.key) as conveyor:
            job = await conveyor.submit("demo.echo", {"a": 1})
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, _run, pg_engine, job.id)
            done = await conveyor.wait(job.id, timeout=20)
            batch = await conveyor.submit_batch([{"task": "demo.echo"}] * 3)
            with pytest.raises(ConveyorError):
                await conveyor.retry(job.id)  # succeeded: not retryable
            return done, await conveyor.get(job.id), len(batch)

    done, fetched, made = asyncio.run(scenario())
    assert done.state == "succeeded" and fetched == done and made == 3


def test_a_workflow_built_in_code_submitted_waited_for_and_cancelled(
    live_api: LiveApi, pg_engine: Engine
) -> None:
    flow = chain(
        step("fetch", "demo.echo", {"n": 1}),
        group(step("left", "demo.echo"), step("right", "demo.echo")),
        step("report", "demo.collect", run_if="finished"),
    )
    assert [(s["key"], s["after"]) for s in flow.to_json()] == [
        ("fetch", []),
        ("left", ["fetch"]),
        ("right", ["fetch"]),
        ("report", ["left", "right"]),
    ]
    with Client(live_api.url, live_api.key) as conveyor:
        workflow = conveyor.workflow(flow, name="upload", tags=["t"])
        assert (workflow.name, workflow.state, workflow.tags) == ("upload", "running", ["t"])
        assert workflow.step("report").after == ["left", "right"]
        assert workflow.step("fetch").state == "queued"
        # Run the steps as workers would, in order; the wait sees the end.
        for key in ("fetch", "left", "right", "report"):
            _run(pg_engine, workflow.step(key).job_id, result={"key": key})
        done = conveyor.wait_workflow(workflow.id, timeout=10)
        assert done.state == "succeeded" and done.finished
        assert {s.state for s in done.steps} == {"succeeded"}
        # A second one, cancelled; waiting on a running one times out with it.
        other = conveyor.workflow([StepSpec("only", "demo.sleep", {"seconds": 30})])
        with pytest.raises(WaitTimeout) as timed_out:
            conveyor.wait_workflow(other.id, timeout=0.2)
        assert timed_out.value.job.id == other.id
        cancelled = conveyor.cancel_workflow(other.id)
        assert cancelled.state == "cancelled"
        with pytest.raises(ConveyorError) as refused:
            conveyor.cancel_workflow(other.id)
        assert refused.value.status == 409
        with pytest.raises(ConveyorError) as invalid:
            conveyor.workflow([StepSpec("a", "demo.echo", after=("ghost",))])
        assert invalid.value.status == 422
        assert invalid.value.errors is not None
        assert invalid.value.errors[0]["loc"] == ["body", "steps", 0, "after"]
