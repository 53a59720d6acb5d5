"""A Python client for Conveyor's HTTP API: `Client` (blocking) and `AsyncClient` (asyncio).

    from conveyor.client import Client

    with Client("http://localhost:8000", api_key) as conveyor:
        job = conveyor.submit("demo.echo", {"hello": "world"})
        done = conveyor.wait(job.id, timeout=30)
        print(done.state, done.result)

Results are typed (`Job`, `DeadLetters`); an answer other than a success raises
`ConveyorError`, which carries the problem's `status`, `type`, `title`, `detail` and
`errors`; `wait` raises `WaitTimeout` (a TimeoutError) holding the job as last seen when
the job has not finished in time. Both clients build the same requests and read the same
answers; only the sending differs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import httpx

from conveyor.client.calls import (
    JobId,
    _action,
    _answer,
    _Call,
    _cancel_workflow,
    _dead_letters,
    _get,
    _get_workflow,
    _http_options,
    _replay,
    _request_options,
    _submit,
    _submit_batch,
    _wait_step,
    _workflow,
)
from conveyor.client.results import (
    ConveyorError,
    DeadGroup,
    DeadLetters,
    Job,
    JobError,
    WaitTimeout,
)
from conveyor.client.workflows import (
    Flow,
    StepSpec,
    Workflow,
    WorkflowStep,
    chain,
    group,
    step,
    steps_of,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ConveyorError",
    "DeadGroup",
    "DeadLetters",
    "Flow",
    "Job",
    "JobError",
    "StepSpec",
    "WaitTimeout",
    "Workflow",
    "WorkflowStep",
    "chain",
    "group",
    "step",
]

T = TypeVar("T")


class Client:
    """Conveyor's API over a blocking httpx client; use it in a `with` block or `close()` it."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(transport=transport, **_http_options(base_url, api_key, timeout))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        response = self._http.request(call.method, call.path, **_request_options(call))
        return _answer(call, response)

    def submit(
        self, task: str, payload: Any = None, *, idempotency_key: str | None = None, **options: Any
    ) -> Job:
        """Submit one job; options are `priority`, `delay_seconds` or `run_at`,
        `max_attempts`, `timeout_seconds` and `tags`."""
        return self._send(_submit(task, payload, idempotency_key, **options))

    def submit_batch(self, jobs: Sequence[Mapping[str, Any]]) -> list[Job]:
        """Submit up to 1,000 jobs at once (each a mapping with `task`, `payload`, options):
        all are accepted or none."""
        return self._send(_submit_batch(jobs))

    def get(self, job_id: JobId) -> Job:
        """The job as it is now."""
        return self._send(_get(job_id))

    def wait(self, job_id: JobId, timeout: float = 60.0) -> Job:
        """The job once finished; WaitTimeout if it has not finished within `timeout` s."""
        deadline = time.monotonic() + timeout
        job = self._send(_get(job_id, _wait_step(deadline)))
        while not job.finished and time.monotonic() < deadline:
            job = self._send(_get(job_id, _wait_step(deadline)))
        if not job.finished:
            raise WaitTimeout(job, timeout)
        return job

    def cancel(self, job_id: JobId) -> Job:
        """Cancel a job that has not finished (a running one is stopped)."""
        return self._send(_action(job_id, "cancel"))

    def retry(self, job_id: JobId) -> Job:
        """Queue a dead or cancelled job again under its own id."""
        return self._send(_action(job_id, "retry"))

    def dead_letters(
        self, *, task: str | None = None, error_type: str | None = None, limit: int = 100
    ) -> DeadLetters:
        """Dead jobs, filtered by task and error type, with their groups."""
        return self._send(_dead_letters(task, error_type, limit))

    def replay_dead_letters(
        self,
        ids: Sequence[JobId] | None = None,
        *,
        task: str | None = None,
        error_type: str | None = None,
    ) -> int:
        """Queue dead jobs again (these ids, or those a filter selects); how many."""
        return self._send(_replay(ids, task, error_type))

    def workflow(
        self,
        flow: Flow | Sequence[StepSpec | Mapping[str, Any]],
        *,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Workflow:
        """Submit a workflow: a flow built with `step`, `chain` and `group`, or its steps."""
        return self._send(_workflow(steps_of(flow), name, tags, idempotency_key))

    def get_workflow(self, workflow_id: JobId) -> Workflow:
        """The workflow and its steps as they are now."""
        return self._send(_get_workflow(workflow_id))

    def wait_workflow(self, workflow_id: JobId, timeout: float = 60.0) -> Workflow:
        """The workflow once every step has finished; WaitTimeout if not within `timeout`."""
        deadline = time.monotonic() + timeout
        flow = self._send(_get_workflow(workflow_id, _wait_step(deadline)))
        while not flow.finished and time.monotonic() < deadline:
            flow = self._send(_get_workflow(workflow_id, _wait_step(deadline)))
        if not flow.finished:
            raise WaitTimeout(flow, timeout)
        return flow

    def cancel_workflow(self, workflow_id: JobId) -> Workflow:
        """Cancel every unfinished step of the workflow (running ones are stopped)."""
        return self._send(_cancel_workflow(workflow_id))


class AsyncClient:
    """Conveyor's API over an asyncio httpx client; `async with` it or `await aclose()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        options = _http_options(base_url, api_key, timeout)
        self._http = httpx.AsyncClient(transport=transport, **options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        response = await self._http.request(call.method, call.path, **_request_options(call))
        return _answer(call, response)

    async def submit(
        self, task: str, payload: Any = None, *, idempotency_key: str | None = None, **options: Any
    ) -> Job:
        """See Client.submit."""
        return await self._send(_submit(task, payload, idempotency_key, **options))

    async def submit_batch(self, jobs: Sequence[Mapping[str, Any]]) -> list[Job]:
        """See Client.submit_batch."""
        return await self._send(_submit_batch(jobs))

    async def get(self, job_id: JobId) -> Job:
        """See Client.get."""
        return await self._send(_get(job_id))

    async def wait(self, job_id: JobId, timeout: float = 60.0) -> Job:
        """See Client.wait."""
        deadline = time.monotonic() + timeout
        job = await self._send(_get(job_id, _wait_step(deadline)))
        while not job.finished and time.monotonic() < deadline:
            job = await self._send(_get(job_id, _wait_step(deadline)))
        if not job.finished:
            raise WaitTimeout(job, timeout)
        return job

    async def cancel(self, job_id: JobId) -> Job:
        """See Client.cancel."""
        return await self._send(_action(job_id, "cancel"))

    async def retry(self, job_id: JobId) -> Job:
        """See Client.retry."""
        return await self._send(_action(job_id, "retry"))

    async def dead_letters(
        self, *, task: str | None = None, error_type: str | None = None, limit: int = 100
    ) -> DeadLetters:
        """See Client.dead_letters."""
        return await self._send(_dead_letters(task, error_type, limit))

    async def replay_dead_letters(
        self,
        ids: Sequence[JobId] | None = None,
        *,
        task: str | None = None,
        error_type: str | None = None,
    ) -> int:
        """See Client.replay_dead_letters."""
        return await self._send(_replay(ids, task, error_type))

    async def workflow(
        self,
        flow: Flow | Sequence[StepSpec | Mapping[str, Any]],
        *,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Workflow:
        """See Client.workflow."""
        return await self._send(_workflow(steps_of(flow), name, tags, idempotency_key))

    async def get_workflow(self, workflow_id: JobId) -> Workflow:
        """See Client.get_workflow."""
        return await self._send(_get_workflow(workflow_id))

    async def wait_workflow(self, workflow_id: JobId, timeout: float = 60.0) -> Workflow:
        """See Client.wait_workflow."""
        deadline = time.monotonic() + timeout
        flow = await self._send(_get_workflow(workflow_id, _wait_step(deadline)))
        while not flow.finished and time.monotonic() < deadline:
            flow = await self._send(_get_workflow(workflow_id, _wait_step(deadline)))
        if not flow.finished:
            raise WaitTimeout(flow, timeout)
        return flow

    async def cancel_workflow(self, workflow_id: JobId) -> Workflow:
        """See Client.cancel_workflow."""
        return await self._send(_cancel_workflow(workflow_id))
