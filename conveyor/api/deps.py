"""Request dependencies: the shared state, the store session, the caller's key and scopes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from conveyor.api.problems import Problem
from conveyor.api.ratelimit import retry_after
from conveyor.api.state import ApiState
from conveyor.jobs.keys import ApiKey


async def get_state(request: Request) -> ApiState:
    """The API's shared state."""
    state: ApiState = request.app.state.conveyor
    return state


State = Annotated[ApiState, Depends(get_state)]

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="conveyor"'}

# Declares the scheme in the OpenAPI document; a missing key is answered below, as a problem.
BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


async def get_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> ApiKey:
    """The caller's API key from `Authorization: Bearer …`; 401 when missing or unknown.

    A key seen in the last seconds is answered from memory on the event loop; only a
    lookup in the store goes to a thread.
    """
    presented = credentials.credentials.strip() if credentials is not None else ""
    if not presented:
        raise Problem(401, "an API key is required: Authorization: Bearer <key>", headers=CHALLENGE)
    known, key = state.key_cache.cached(presented)
    if not known:
        key = await run_in_threadpool(state.key_cache.lookup, state.sessions, presented)
    if key is None:
        raise Problem(401, "the API key is unknown or revoked", headers=CHALLENGE)
    assert state.limiter is not None
    wait = state.limiter.acquire(str(key.id))
    if wait:
        raise Problem(
            429,
            "this API key is over its request rate; slow down",
            slug="rate-limited",
            headers={"Retry-After": retry_after(wait)},
        )
    return key


def require(scope: str) -> Callable[[ApiKey], Awaitable[ApiKey]]:
    """A dependency that answers 403 unless the key has `scope` (admin has every scope)."""

    async def check(key: Annotated[ApiKey, Depends(get_key)]) -> ApiKey:
        if scope not in key.scopes and "admin" not in key.scopes:
            raise Problem(403, f"this API key lacks the {scope!r} scope")
        return key

    return check


Submitter = Annotated[ApiKey, Depends(require("submit"))]
Reader = Annotated[ApiKey, Depends(require("read"))]
Admin = Annotated[ApiKey, Depends(require("admin"))]
