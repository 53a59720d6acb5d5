"""/v1/queues, /v1/stats and /v1/stats/anomalies: what operators watch."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from conveyor.api.deps import Reader, State
from conveyor.api.problems import Problem
from conveyor.api.routes.jobs import PROBLEMS
from conveyor.api.schemas import AnomaliesOut, AnomalyOut
from conveyor.config import POOLS
from conveyor.jobs import anomalies, rollups, store
from conveyor.jobs.quantiles import Quantiles
from conveyor.jobs.states import JobState
from conveyor.jobs.store import workflows as flows

router = APIRouter(prefix="/v1", tags=["operations"])

WINDOW = re.compile(r"^(\d{1,7})([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = 30 * 86400


class QueueOut(BaseModel):
    """One pool's queue: messages waiting in the broker and the tenant's jobs by state."""

    name: str
    depth: int | None
    queued: int
    running: int
    scheduled: int
    retrying: int
    rate_limited: int = Field(0, description="scheduled jobs waiting for a rate-limit slot")


class QueuesOut(BaseModel):
    """Every pool's queue."""

    items: list[QueueOut]


class Percentiles(BaseModel):
    """p50, p95 and p99 in seconds; null without samples."""

    p50: float | None
    p95: float | None
    p99: float | None


class TaskStats(BaseModel):
    """One task type over the window."""

    task: str
    counts: dict[str, int]
    run_seconds: Percentiles
    queue_wait_seconds: Percentiles


class StatsOut(BaseModel):
    """Per task type: counts by state and percentiles of run time and queue wait."""

    window_seconds: int
    since: dt.datetime
    items: list[TaskStats]
    workflows: dict[str, int] = Field(
        default_factory=dict,
        description="The tenant's workflows started in the window, by state now",
    )


@router.get("/queues", response_model=QueuesOut, responses=PROBLEMS)
def list_queues(key: Reader, state: State) -> QueuesOut:
    """Depth per queue in the broker, and the tenant's unfinished jobs per queue and state."""
    try:
        depths: dict[str, int] | None = state.queue_depths() if state.queue_depths else None
    except Exception:
        depths = None
    with state.read_sessions() as session:
        counts = store.counts_by_queue(session, tenant=key.tenant)
    return QueuesOut(
        items=[
            QueueOut(
                name=name,
                depth=None if depths is None else depths.get(name, 0),
                **{
                    s: counts.get(name, {}).get(s, 0)
                    for s in (
                        JobState.QUEUED,
                        JobState.RUNNING,
                        JobState.SCHEDULED,
                        JobState.RETRYING,
                        "rate_limited",
                    )
                },
            )
            for name in POOLS
        ]
    )


def parse_window(text: str) -> int:
    """Seconds in a window such as `900`, `15m`, `1h` or `7d` (at most 30 days)."""
    match = WINDOW.match(text.strip())
    if match is None:
        raise Problem(
            422,
            "window must be a number of seconds or like 15m, 1h, 7d",
            slug="invalid-window",
            errors=[{"loc": ["query", "window"], "msg": "invalid window"}],
        )
    seconds = int(match.group(1)) * UNITS[match.group(2)]
    if not 1 <= seconds <= MAX_WINDOW:
        raise Problem(
            422,
            "window must be between 1 second and 30 days",
            slug="invalid-window",
            errors=[{"loc": ["query", "window"], "msg": "out of range"}],
        )
    return seconds


def percentiles(quantiles: Quantiles) -> Percentiles:
    """The API's shape of p50/p95/p99."""
    return Percentiles(p50=quantiles.p50, p95=quantiles.p95, p99=quantiles.p99)


@router.get("/stats/anomalies", response_model=AnomaliesOut, responses=PROBLEMS)
def stats_anomalies(key: Reader, state: State) -> AnomaliesOut:
    """The tenant's task types whose failure rate, run p95 or wait p95 is out of baseline now."""
    with state.read_sessions() as session:
        found = anomalies.open_episodes(session, tenant=key.tenant)
    return AnomaliesOut(items=[AnomalyOut.of(episode) for episode in found])


@router.get("/stats", response_model=StatsOut, responses=PROBLEMS)
def stats(
    key: Reader,
    state: State,
    window: Annotated[str, Query(max_length=12)] = "1h",
) -> StatsOut:
    """Per task type over the window: counts by state, p50/p95/p99 of run time and queue wait."""
    seconds = parse_window(window)
    now = store.utcnow()
    since = now - dt.timedelta(seconds=seconds)
    # Rolled-up minutes, plus the few raw jobs past the rollups' watermark.
    with state.read_sessions() as session:
        found = rollups.window_stats(session, tenant=key.tenant, since=since, now=now)
        started = flows.workflow_counts(session, tenant=key.tenant, since=since)
    return StatsOut(
        workflows=started,
        window_seconds=seconds,
        since=since,
        items=[
            TaskStats(
                task=item.task,
                counts=item.counts,
                run_seconds=percentiles(item.run_seconds),
                queue_wait_seconds=percentiles(item.queue_wait_seconds),
            )
            for item in found
        ],
    )
