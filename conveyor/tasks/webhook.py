"""webhook.deliver: POST a JSON body, keyed by the job id so receivers can deduplicate."""

from __future__ import annotations

from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from conveyor.config import get_settings
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


class DeliveryRefused(PermanentError):
    """The URL leads to an address deliveries may not reach; no connection was made."""


@registry.task("webhook.deliver", WebhookPayload, max_attempts=8, timeout_seconds=60.0)
def deliver(payload: WebhookPayload, ctx: TaskContext) -> Any:
    """POSTs the body as JSON with `Idempotency-Key: <job id>`; 2xx succeeds."""
    # The HTTP client loads with a process's first delivery: a worker (and each of its pool
    # children) that delivers no webhook never holds it.
    import httpx

    from conveyor.tasks import outbound

    headers = {**payload.headers, "Idempotency-Key": ctx.job_id}
    # Read per delivery from the worker's settings (validated when the process started).
    backend = outbound.GuardedBackend(get_settings().webhook_allowed_networks)
    try:
        with outbound.guarded_client(backend, timeout=30.0) as client:
            response = client.post(str(payload.url), json=payload.body, headers=headers)
    except outbound.AddressRefused as error:
        raise DeliveryRefused(str(error)) from error
    except httpx.HTTPError as error:
        raise WebhookFailed(f"{type(error).__name__}: {error}") from error
    status = response.status_code
    if 200 <= status < 300:
        return {"status": status}
    message = f"receiver answered {status}"
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise WebhookFailed(message)
    if 300 <= status < 400:
        # The guard checks one destination; a redirect would be a second one, chosen by
        # the receiver, so it is not followed and the job names where it pointed.
        location = response.headers.get("location", "")[:500]
        raise PermanentError(
            f"{message}, a redirect to {location or '?'}; redirects are not followed"
        )
    raise PermanentError(message)
