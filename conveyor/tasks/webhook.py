"""webhook.deliver: POST a JSON body, keyed by the job id so receivers can deduplicate."""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from conveyor.tasks.registry import PermanentError, RetryableError, TaskContext, registry

RETRYABLE_STATUSES = frozenset({408, 429})


class WebhookPayload(BaseModel):
    """Where to deliver, what, and with which extra headers."""

    model_config = ConfigDict(extra="forbid")
    url: AnyHttpUrl
    body: Any
    headers: dict[str, str] = Field(default_factory=dict)


class WebhookFailed(RetryableError):
    """The receiver answered with a status worth trying again."""


@registry.task("webhook.deliver", WebhookPayload, max_attempts=8, timeout_seconds=60.0)
def deliver(payload: WebhookPayload, ctx: TaskContext) -> Any:
    """POSTs the body as JSON with `Idempotency-Key: <job id>`; 2xx succeeds."""
    headers = {**payload.headers, "Idempotency-Key": ctx.job_id}
    try:
        response = httpx.post(str(payload.url), json=payload.body, headers=headers, timeout=30.0)
    except httpx.HTTPError as error:
        raise WebhookFailed(f"{type(error).__name__}: {error}") from error
    status = response.status_code
    if 200 <= status < 300:
        return {"status": status}
    message = f"receiver answered {status}"
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise WebhookFailed(message)
    raise PermanentError(message)
