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

import datetime as dt
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

__all__ = [
    "AsyncClient",
    "Client",
    "ConveyorError",
    "DeadGroup",
    "DeadLetters",
    "Job",
    "JobError",
    "WaitTimeout",
]

T = TypeVar("T")
JobId = uuid.UUID | str

TERMINAL = frozenset({"succeeded", "dead", "cancelled"})
# The longest `?wait=` the API takes; a longer wait is several requests.
MAX_WAIT_SECONDS = 60.0
# Time allowed for an answer beyond the wait the request asked for.
ANSWER_SECONDS = 10.0


# --------------------------------------------------------------------------- results


def _time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class JobError:
    """What went wrong in a job's last failed attempt."""

    type: str
    message: str
    traceback: str | None = None


@dataclass(frozen=True)
class Job:
    """A job as the API shows it."""

    id: uuid.UUID
    task: str
    state: str
    priority: str
    queue: str
    payload: Any
    result: Any
    error: JobError | None
    attempts: int
    max_attempts: int
    timeout_seconds: float
    progress: Any
    tags: list[str]
    idempotency_key: str | None
    created_at: dt.datetime
    scheduled_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def finished(self) -> bool:
        """Whether the job is in a terminal state (succeeded, dead or cancelled)."""
        return self.state in TERMINAL

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        """The job of an API answer."""
        error = data.get("error")
        created = _time(data["created_at"])
        assert created is not None
        return cls(
            id=uuid.UUID(data["id"]),
            task=data["task"],
            state=data["state"],
            priority=data["priority"],
            queue=data["queue"],
            payload=data.get("payload"),
            result=data.get("result"),
            error=None if error is None else JobError(**error),
            attempts=data["attempts"],
            max_attempts=data["max_attempts"],
            timeout_seconds=data["timeout_seconds"],
            progress=data.get("progress"),
            tags=list(data.get("tags") or []),
            idempotency_key=data.get("idempotency_key"),
            created_at=created,
            scheduled_at=_time(data.get("scheduled_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
        )


@dataclass(frozen=True)
class DeadGroup:
    """Dead jobs sharing a task, an error type and an error fingerprint."""

    task: str
    error_type: str
    fingerprint: str
    count: int


@dataclass(frozen=True)
class DeadLetters:
    """Dead jobs, most recent first, and their groups."""

    items: list[Job]
    groups: list[DeadGroup]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeadLetters:
        """The dead letters of an API answer."""
        return cls(
            items=[Job.from_json(item) for item in data["items"]],
            groups=[DeadGroup(**group) for group in data["groups"]],
        )


class ConveyorError(Exception):
    """An answer other than a success, with the problem the API described (RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ConveyorError:
        """The error of a refused request; a body that is no problem is still reported."""
        try:
            body = response.json()
        except ValueError:
            body = None
        retry = response.headers.get("Retry-After")
        retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        if not isinstance(body, dict):
            text = response.text.strip()[:500] or response.reason_phrase
            return cls(response.status_code, response.reason_phrase, text, retry_after=retry_after)
        return cls(
            int(body.get("status", response.status_code)),
            str(body.get("title", response.reason_phrase)),
            str(body.get("detail", "")),
            type=str(body.get("type", "about:blank")),
            errors=body.get("errors"),
            retry_after=retry_after,
        )


class WaitTimeout(TimeoutError):
    """The job had not finished when the wait ran out; `job` is how it was last seen."""

    def __init__(self, job: Job, seconds: float) -> None:
        super().__init__(f"job {job.id} is still {job.state} after {seconds:g} s")
        self.job = job


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and how its answer is read."""

    method: str
    path: str
    read: Callable[[Any], T]
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None


def _job_body(task: str, payload: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"task": task, "payload": {} if payload is None else payload}
    for name, value in options.items():
        if value is None:
            continue
        body[name] = value.isoformat() if isinstance(value, dt.datetime) else value
    return body


def _submit(task: str, payload: Any, idempotency_key: str | None, **options: Any) -> _Call[Job]:
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    body = _job_body(task, payload, options)
    return _Call("POST", "/v1/jobs", Job.from_json, json=body, headers=headers)


def _submit_batch(jobs: Sequence[Mapping[str, Any]]) -> _Call[list[Job]]:
    body = {"jobs": [_job_body(j["task"], j.get("payload"), _options(j)) for j in jobs]}
    return _Call("POST", "/v1/jobs/batch", lambda d: [Job.from_json(j) for j in d["jobs"]], body)


def _options(job: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in ("task", "payload")}


def _get(job_id: JobId, wait: float = 0.0) -> _Call[Job]:
    params = {"wait": f"{wait:g}"} if wait > 0 else {}
    timeout = wait + ANSWER_SECONDS if wait > 0 else None
    return _Call("GET", f"/v1/jobs/{job_id}", Job.from_json, params=params, timeout=timeout)


def _action(job_id: JobId, action: str) -> _Call[Job]:
    return _Call("POST", f"/v1/jobs/{job_id}/{action}", Job.from_json)


def _dead_letters(task: str | None, error_type: str | None, limit: int) -> _Call[DeadLetters]:
    params: dict[str, Any] = {"limit": limit}
    params.update({k: v for k, v in (("task", task), ("error_type", error_type)) if v})
    return _Call("GET", "/v1/dead-letters", DeadLetters.from_json, params=params)


def _replay(ids: Sequence[JobId] | None, task: str | None, error_type: str | None) -> _Call[int]:
    body: dict[str, Any] = {"task": task, "error_type": error_type}
    if ids is not None:
        body["ids"] = [str(i) for i in ids]
    body = {k: v for k, v in body.items() if v is not None}
    return _Call("POST", "/v1/dead-letters/replay", lambda d: int(d["replayed"]), json=body)


def _answer(call: _Call[T], response: httpx.Response) -> T:
    if response.is_success:
        return call.read(response.json())
    raise ConveyorError.from_response(response)


def _http_options(base_url: str, api_key: str, timeout: float) -> dict[str, Any]:
    if not api_key:
        raise ValueError("an API key is required")
    return {
        "base_url": base_url.rstrip("/"),
        "headers": {"Authorization": f"Bearer {api_key}", "User-Agent": "conveyor-client"},
        "timeout": timeout,
    }


def _request_options(call: _Call[Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"params": call.params, "headers": call.headers}
    if call.json is not None:
        options["json"] = call.json
    if call.timeout is not None:
        options["timeout"] = call.timeout
    return options


def _wait_step(deadline: float) -> float:
    """Seconds the next `?wait=` request may ask for: what is left, at most a minute."""
    return max(0.0, min(MAX_WAIT_SECONDS, deadline - time.monotonic()))


# --------------------------------------------------------------------------- clients


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
