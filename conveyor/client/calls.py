"""The requests of the client's calls and how their answers are read, shared by both
clients (only the sending differs)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from conveyor.client.results import ConveyorError, DeadLetters, Job
from conveyor.client.workflows import Workflow

T = TypeVar("T")
JobId = uuid.UUID | str

# The longest `?wait=` the API takes; a longer wait is several requests.
MAX_WAIT_SECONDS = 60.0
# Time allowed for an answer beyond the wait the request asked for.
ANSWER_SECONDS = 10.0


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


def _workflow(
    steps: list[dict[str, Any]],
    name: str | None,
    tags: Sequence[str] | None,
    idempotency_key: str | None,
) -> _Call[Workflow]:
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    body: dict[str, Any] = {"steps": steps, "tags": list(tags or [])}
    if name is not None:
        body["name"] = name
    return _Call("POST", "/v1/workflows", Workflow.from_json, json=body, headers=headers)


def _get_workflow(workflow_id: JobId, wait: float = 0.0) -> _Call[Workflow]:
    params = {"wait": f"{wait:g}"} if wait > 0 else {}
    timeout = wait + ANSWER_SECONDS if wait > 0 else None
    path = f"/v1/workflows/{workflow_id}"
    return _Call("GET", path, Workflow.from_json, params=params, timeout=timeout)


def _cancel_workflow(workflow_id: JobId) -> _Call[Workflow]:
    return _Call("POST", f"/v1/workflows/{workflow_id}/cancel", Workflow.from_json)
