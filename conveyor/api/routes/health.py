"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from conveyor.api.deps import State
from conveyor.api.problems import PROBLEM_JSON
from conveyor.api.routes.jobs import PROBLEMS

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/readyz", responses={503: {**PROBLEMS[503], "description": "a dependency does not answer"}}
)
def readyz(state: State) -> JSONResponse:
    """200 when the database and the broker answer; otherwise 503 naming which does not.

    With a read replica, `checks.replica` says how far behind it is, or that it does not
    answer and reads go to the primary."""
    checks: dict[str, str] = {}
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unavailable: {type(error).__name__}"
    try:
        state.broker_check()
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"unavailable: {type(error).__name__}"
    failing = [name for name, result in checks.items() if result != "ok"]
    # A replica that does not answer is not an outage: its reads go to the primary.
    replica = state.read_sessions.status()
    if replica is not None:
        checks["replica"] = replica
    if not failing:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {
            "type": "/problems/not-ready",
            "title": "Service unavailable",
            "status": 503,
            "detail": f"not ready: {', '.join(failing)} unavailable",
            "checks": checks,
        },
        status_code=503,
        media_type=PROBLEM_JSON,
    )
