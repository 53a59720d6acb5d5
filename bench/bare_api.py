"""The bare side of `bench.submit`: a FastAPI app that only parses a submission and echoes it.

`BareJobIn` mirrors `conveyor.api.schemas.JobIn` field for field (same types, bounds,
`extra="forbid"` and the same after-validator), and `BareBatchIn` mirrors `BatchIn` (1 to
1,000 jobs). The routes are plain `def` functions like Conveyor's, so FastAPI runs them in
its thread pool the same way, and they answer 202 with the parsed body through a response
model (parsed, validated and serialized again, as Conveyor's `JobOut` is). What the app
lacks is everything Conveyor does per request: the API key lookup and scope check, the rate
limiter, the body size middleware, the payload check against the task type, the INSERTs and
the publish to the broker.

It is served exactly as `conveyor api` serves Conveyor, with `uvicorn.run(app, ...)` in one
process, `access_log=False` and the given log level:

    BENCH_API_PORT=8123 python -m bench.bare_api
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from conveyor.jobs.states import Priority


class BareJobIn(BaseModel):
    """A job to submit: the same fields and checks as Conveyor's JobIn."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    payload: Any = Field(default_factory=dict)
    priority: Priority | None = None
    delay_seconds: float | None = Field(None, ge=0, le=366 * 86400)
    run_at: AwareDatetime | None = None
    max_attempts: int | None = Field(None, ge=1, le=100)
    timeout_seconds: float | None = Field(None, gt=0, le=86400)
    tags: list[str] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _one_delay(self) -> BareJobIn:
        if self.delay_seconds is not None and self.run_at is not None:
            raise ValueError("give delay_seconds or run_at, not both")
        for tag in self.tags:
            if not 1 <= len(tag) <= 64:
                raise ValueError("each tag must be 1 to 64 characters")
        return self


class BareBatchIn(BaseModel):
    """Up to 1,000 jobs submitted together, as Conveyor's BatchIn."""

    model_config = ConfigDict(extra="forbid")
    jobs: list[BareJobIn] = Field(min_length=1, max_length=1000)


app = FastAPI(title="bare submit")


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@app.post("/v1/jobs", status_code=202, response_model=BareJobIn)
def submit_job(body: BareJobIn) -> BareJobIn:
    """Parse one submission and echo it."""
    return body


@app.post("/v1/jobs/batch", status_code=202, response_model=BareBatchIn)
def submit_batch(body: BareBatchIn) -> BareBatchIn:
    """Parse a batch and echo it."""
    return body


def main() -> None:
    """Serve the app the way `conveyor.cli.services.api` serves Conveyor's."""
    uvicorn.run(
        app,
        host=os.environ.get("BENCH_API_HOST", "127.0.0.1"),
        port=int(os.environ.get("BENCH_API_PORT", "8001")),
        log_level=os.environ.get("BENCH_LOG_LEVEL", "warning").lower(),
        access_log=False,
    )


if __name__ == "__main__":
    main()
