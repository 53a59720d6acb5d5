"""The console's pages: each reads the durable record of the signed-in key's tenant."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from conveyor.api.console import drawing
from conveyor.api.console.auth import Reader, Viewer
from conveyor.api.console.render import page
from conveyor.api.deps import State
from conveyor.api.problems import Problem
from conveyor.api.routes import operations
from conveyor.api.routes.jobs import jobs_page
from conveyor.api.state import ApiState
from conveyor.config import Settings
from conveyor.jobs import anomalies, schedules, series, store
from conveyor.jobs.states import JobState
from conveyor.jobs.store import workflows as flows

router = APIRouter(prefix="/ui", include_in_schema=False)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE_SIZE = 50
# A graph of more steps than this is shown as the table alone.
GRAPH_LIMIT = 300
NEXT_RUNS = 3
NOTICES = {
    "retried": "The job is queued again.",
    "cancelled": "The job is cancelled.",
    "replayed": "Dead jobs queued again: {count}.",
    "discarded": "The dead job is removed.",
    "paused": "The schedule is paused.",
    "enabled": "The schedule is enabled.",
    "ran": "The schedule fired a run now.",
    "workflow-cancelled": "The workflow is cancelled.",
}


def notice(code: str | None, count: str | None = None) -> str | None:
    """The sentence an action's redirect names."""
    if code not in NOTICES:
        return None
    return NOTICES[code].format(count=count if count and count.isdigit() else "?")


def flower_link(settings: Settings) -> str | None:
    """Where an operator's browser finds Flower: the setting, or, when `conveyor up` runs
    Flower beside an API on loopback, that Flower."""
    if settings.flower_url:
        return settings.flower_url.rstrip("/")
    if settings.flower_user and settings.flower_password and settings.api_host in LOOPBACK:
        return f"http://{settings.api_host}:{settings.flower_port}"
    return None


def problem_page(viewer: Viewer | None, problem: Problem) -> HTMLResponse:
    """A Problem from the shared route code, as a page."""
    return page("error.html", status=problem.status, viewer=viewer, problem=problem)


def _overview(state: ApiState, viewer: Viewer) -> dict[str, Any]:
    queues = operations.list_queues(viewer.key, state).items
    with state.read_sessions() as session:
        now = store.utcnow()
        oldest = store.oldest_queued_by_queue(session, tenant=viewer.tenant)
        found = series.minute_series(
            session, tenant=viewer.tenant, since=now - dt.timedelta(hours=1), now=now
        )
        open_anomalies = anomalies.open_episodes(session, tenant=viewer.tenant)
    charts = []
    for task in found:
        charts.append(
            {
                "task": task.task,
                "finished": task.finished,
                "failure_rate": task.failure_rate,
                "throughput": drawing.bars(
                    [float(m.finished) for m in task.minutes],
                    label=f"{task.task}: jobs finished per minute",
                    unit=" jobs",
                ),
                "failures": drawing.bars(
                    [(m.failed / m.finished) if m.finished else None for m in task.minutes],
                    label=f"{task.task}: share failed per minute",
                ),
                "wait": drawing.bars(
                    [m.wait_p95 for m in task.minutes],
                    label=f"{task.task}: queue wait p95 per minute",
                    unit=" s",
                ),
                "wait_p95": max((m.wait_p95 or 0.0 for m in task.minutes), default=None),
            }
        )
    return {
        "queues": queues,
        "oldest": oldest,
        "charts": charts,
        "anomalies": open_anomalies,
        "now": now,
    }


@router.get("/", response_class=HTMLResponse)
async def overview(viewer: Reader, state: State) -> Response:
    """Each queue's depth and backlog; each task type's last hour, drawn."""
    found = await run_in_threadpool(_overview, state, viewer)
    return page("overview.html", viewer=viewer, active="overview", **found)


@router.get("", include_in_schema=False)
async def overview_slash() -> Response:
    """`/ui` is `/ui/`."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_list_page(
    viewer: Reader,
    state: State,
    job_state: Annotated[str | None, Query(alias="state", max_length=16)] = None,
    task: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[str | None, Query(max_length=100)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The tenant's jobs, newest first, filtered, a page at a time, refreshed while open."""
    filters = {"state": job_state or "", "task": task or "", "tag": tag or "", "q": q or ""}
    if q and q.strip():
        try:
            return RedirectResponse(f"/ui/jobs/{uuid.UUID(q.strip())}", status_code=303)
        except ValueError:
            return problem_page(viewer, Problem(422, f"{q.strip()!r} is not a job id"))
    try:
        chosen = JobState(job_state) if job_state else None
    except ValueError:
        return problem_page(viewer, Problem(422, f"there is no job state {job_state!r}"))
    try:
        found, next_cursor = await run_in_threadpool(
            jobs_page, state, viewer.tenant, chosen, task or None, tag or None, PAGE_SIZE, cursor
        )
    except Problem as problem:
        return problem_page(viewer, problem)
    return page(
        "jobs.html",
        viewer=viewer,
        active="jobs",
        filters={**filters, "cursor": cursor or ""},
        jobs=found,
        next_cursor=next_cursor,
    )


def _job(state: ApiState, viewer: Viewer, job_id: uuid.UUID) -> dict[str, Any] | None:
    def read(session: Session) -> dict[str, Any] | None:
        job = store.get_job(session, job_id, tenant=viewer.tenant)
        if job is None:
            return None
        return {"job": job, "attempts": timeline(store.list_events(session, job_id))}

    # From the replica, or from the primary when the replica has not got the job yet.
    return state.read_sessions.first_found(read)


def timeline(events: list[Any]) -> list[tuple[str, list[Any]]]:
    """Events in sections: before the first run, then one per run (each claim begins
    one), and a section wherever an operator queued the job again."""
    sections: list[tuple[str, list[Any]]] = [("Submitted", [])]
    again = 0
    for event in events:
        if event.event == "claimed":
            suffix = f" after retry {again}" if again else ""
            sections.append((f"Attempt {event.attempt}{suffix}", [event]))
        elif event.event == "requeued":
            again += 1
            sections.append((f"Queued again ({again})", [event]))
        else:
            sections[-1][1].append(event)
    return [(title, found) for title, found in sections if found]


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(
    job_id: uuid.UUID,
    viewer: Reader,
    state: State,
    done: Annotated[str | None, Query(max_length=32)] = None,
    count: Annotated[str | None, Query(max_length=12)] = None,
) -> Response:
    """One job: payload, result, error, progress, every attempt's events, its actions."""
    found = await run_in_threadpool(_job, state, viewer, job_id)
    if found is None:
        return problem_page(viewer, Problem(404, f"no job {job_id}"))
    job = found["job"]
    return page(
        "job.html",
        viewer=viewer,
        active="jobs",
        notice=notice(done, count),
        flower=flower_link(state.settings),
        can_retry=job.state in (JobState.DEAD, JobState.CANCELLED),
        can_cancel=not store.is_terminal(job.state),
        **found,
    )


def _dead(state: ApiState, viewer: Viewer) -> dict[str, Any]:
    with state.read_sessions() as session:
        dead = store.list_dead(session, tenant=viewer.tenant, task=None, error_type=None, limit=200)
        groups = store.dead_groups(session, tenant=viewer.tenant)
    return {
        "dead": dead,
        "groups": [
            {"task": t, "error_type": e, "fingerprint": f, "count": n} for t, e, f, n in groups
        ],
    }


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters_page(
    viewer: Reader,
    state: State,
    done: Annotated[str | None, Query(max_length=32)] = None,
    count: Annotated[str | None, Query(max_length=12)] = None,
) -> Response:
    """Dead jobs grouped by error fingerprint, with replay and discard."""
    found = await run_in_threadpool(_dead, state, viewer)
    return page(
        "dead_letters.html", viewer=viewer, active="dead", notice=notice(done, count), **found
    )


def _schedules(state: ApiState, viewer: Viewer) -> list[dict[str, Any]]:
    with state.read_sessions() as session:
        found = schedules.list_schedules(session, viewer.tenant)
        now = store.utcnow()
        listed = []
        for schedule in found:
            upcoming: list[dt.datetime] = []
            tick = schedule.next_run_at
            while schedule.enabled and tick is not None and len(upcoming) < NEXT_RUNS:
                upcoming.append(tick)
                tick = schedules.next_tick(
                    cron=schedule.cron,
                    interval_seconds=schedule.interval_seconds,
                    timezone=schedule.timezone,
                    after=max(tick, now),
                    anchor=tick,
                )
            runs = schedules.recent_runs(session, schedule.id, limit=3)
            listed.append({"schedule": schedule, "upcoming": upcoming, "runs": runs})
    return listed


@router.get("/schedules", response_class=HTMLResponse)
async def schedules_page(
    viewer: Reader, state: State, done: Annotated[str | None, Query(max_length=32)] = None
) -> Response:
    """The tenant's schedules: next runs, last runs, pause, enable, run now."""
    found = await run_in_threadpool(_schedules, state, viewer)
    return page(
        "schedules.html", viewer=viewer, active="schedules", notice=notice(done), schedules=found
    )


@router.get("/workflows", response_class=HTMLResponse)
async def workflows_page(viewer: Reader, state: State) -> Response:
    """The tenant's latest workflows."""

    def read() -> list[flows.Workflow]:
        with state.read_sessions() as session:
            return flows.list_workflows_page(session, tenant=viewer.tenant, state=None, limit=100)

    found = await run_in_threadpool(read)
    return page("workflows.html", viewer=viewer, active="workflows", workflows=found)


@router.get("/workflows/{workflow_id}", response_class=HTMLResponse)
async def workflow_page(
    workflow_id: uuid.UUID,
    viewer: Reader,
    state: State,
    done: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    """One workflow: its steps as a graph coloured by state, and as a table."""

    def read() -> flows.Workflow | None:
        with state.read_sessions() as session:
            return flows.get_workflow(session, workflow_id, tenant=viewer.tenant, steps=True)

    workflow = await run_in_threadpool(read)
    if workflow is None:
        return problem_page(viewer, Problem(404, f"no workflow {workflow_id}"))
    graph = (
        drawing.workflow_graph(workflow.steps, "/ui/jobs/{}")
        if len(workflow.steps) <= GRAPH_LIMIT
        else None
    )
    return page(
        "workflow.html",
        viewer=viewer,
        active="workflows",
        workflow=workflow,
        graph=graph,
        notice=notice(done),
    )


@router.get("/anomalies", response_class=HTMLResponse)
async def anomalies_page(viewer: Reader, state: State) -> Response:
    """Task types whose failure rate, run p95 or wait p95 is out of its baseline now."""

    def read() -> list[anomalies.Episode]:
        with state.read_sessions() as session:
            return anomalies.open_episodes(session, tenant=viewer.tenant)

    found = await run_in_threadpool(read)
    return page("anomalies.html", viewer=viewer, active="anomalies", episodes=found)
