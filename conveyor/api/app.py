"""The FastAPI application: routers, problem+json everywhere, the body size limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from conveyor import __version__
from conveyor.api import console, problems, telemetry
from conveyor.api.limits import BodySizeLimit
from conveyor.api.routes import (
    dead_letters,
    health,
    jobs,
    operations,
    schedules,
    task_types,
    workflows,
)
from conveyor.api.state import ApiState
from conveyor.api.telemetry import ReadsCollector, Telemetry, state_reader
from conveyor.observability.metrics import StateCollector


def create_app(state: ApiState) -> FastAPI:
    """The API over the given store and publisher."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.waiters.close()
        state.workflow_waiters.close()
        # Submissions still waiting are recorded and answered before the process ends.
        await asyncio.to_thread(state.committer.close)

    app = FastAPI(
        lifespan=lifespan,
        title="Conveyor",
        version=__version__,
        description="Submit background jobs, follow them, and operate the platform.",
        # The Telemetry middleware makes the one server span per request (with the request
        # id, the log context and the Prometheus metrics); FastAPI's own would be a second.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.conveyor = state
    problems.install(app)
    app.include_router(jobs.router)
    app.include_router(workflows.router)
    app.include_router(task_types.router)
    app.include_router(dead_letters.router)
    app.include_router(operations.router)
    app.include_router(schedules.router)
    app.include_router(health.router)
    app.include_router(telemetry.router)
    console.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_body_bytes)
    # Outermost: even a request refused for its size is counted and logged.
    app.add_middleware(Telemetry)
    # Gauges of shared state, read when /metrics is scraped; one registry per app.
    app.state.conveyor_gauges = CollectorRegistry()
    app.state.conveyor_gauges.register(StateCollector(lambda: state_reader(state)))
    app.state.conveyor_gauges.register(ReadsCollector(state))
    return app
