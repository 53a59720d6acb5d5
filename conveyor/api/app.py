"""The FastAPI application: routers, problem+json everywhere, the body size limit."""

from __future__ import annotations

from fastapi import FastAPI

from conveyor import __version__
from conveyor.api import problems
from conveyor.api.limits import BodySizeLimit
from conveyor.api.routes import (
    dead_letters,
    health,
    jobs,
    operations,
    schedules,
    task_types,
)
from conveyor.api.state import ApiState


def create_app(state: ApiState) -> FastAPI:
    """The API over the given store and publisher."""
    app = FastAPI(
        title="Conveyor",
        version=__version__,
        description="Submit background jobs, follow them, and operate the platform.",
    )
    app.state.conveyor = state
    problems.install(app)
    app.include_router(jobs.router)
    app.include_router(task_types.router)
    app.include_router(dead_letters.router)
    app.include_router(operations.router)
    app.include_router(schedules.router)
    app.include_router(health.router)
    app.add_middleware(BodySizeLimit, max_bytes=state.settings.max_body_bytes)
    return app
