"""The demo task types: echo, sleep, fail and collect, for trying the platform out."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from conveyor.tasks.registry import PermanentError, RetryableError, TaskContext, registry


class EchoPayload(RootModel[dict[str, Any]]):
    """Any JSON object."""


# demo.sleep reports its progress this often (the contract asks for once a second).
PROGRESS_EVERY_SECONDS = 0.5


class SleepPayload(BaseModel):
    """How long to sleep."""

    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=3600)


class FailPayload(BaseModel):
    """How many attempts fail before one succeeds, and whether failures may be retried."""

    model_config = ConfigDict(extra="forbid")
    failures: int = Field(ge=0, le=100)
    retryable: bool = True


@registry.task("demo.echo", EchoPayload)
def echo(payload: EchoPayload, ctx: TaskContext) -> Any:
    """Returns its payload as the result."""
    return payload.root


@registry.task("demo.sleep", SleepPayload, timeout_seconds=3700.0)
def sleep(payload: SleepPayload, ctx: TaskContext) -> Any:
    """Sleeps for the given seconds, stopping early when the job is cancelled.

    Its progress, `{"slept": seconds so far, "of": seconds}`, is reported at the start and
    then at least once a second.
    """
    started = time.monotonic()
    deadline = started + payload.seconds
    reported = started - PROGRESS_EVERY_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled():
            break
        now = time.monotonic()
        if now - reported >= PROGRESS_EVERY_SECONDS:
            ctx.set_progress({"slept": round(now - started, 3), "of": payload.seconds})
            reported = now
        time.sleep(min(left, 0.2))
    return {"slept": round(time.monotonic() - started, 3)}


class InjectedFailure(RetryableError):
    """The failure demo.fail raises on purpose."""


@registry.task("demo.fail", FailPayload, max_attempts=5, retry_base_seconds=0.5)
def fail(payload: FailPayload, ctx: TaskContext) -> Any:
    """Fails its first `failures` attempts, then succeeds."""
    if ctx.attempt <= payload.failures:
        message = f"failure {ctx.attempt} of {payload.failures}"
        if not payload.retryable:
            raise PermanentError(message)
        raise InjectedFailure(message)
    return {"attempt": ctx.attempt}


@registry.task("demo.collect", EchoPayload)
def collect(payload: EchoPayload, ctx: TaskContext) -> Any:
    """Returns its payload and its parents' results: a workflow's fan-in, made visible."""
    return {"payload": payload.root, "parents": ctx.parent_results}
