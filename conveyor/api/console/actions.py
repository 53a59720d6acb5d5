"""The console's forms: sign-in and out, and what an admin does to jobs and schedules.

Every action goes through the same code as the HTTP API's route (tenant checks, state
rules, publishing), called with the signed-in key; a refusal comes back as a page.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from conveyor.api.console.auth import Actor, Auth, CsrfRefused, Viewer, console_auth
from conveyor.api.console.pages import problem_page
from conveyor.api.console.render import page
from conveyor.api.console.sessions import (
    COOKIE,
    CSRF_FIELD,
    LOGIN_COOKIE,
    LOGIN_SECONDS,
    FormError,
    parse_form,
    tokens_match,
)
from conveyor.api.deps import State
from conveyor.api.problems import Problem
from conveyor.api.routes import dead_letters, jobs, schedules, workflows
from conveyor.api.schemas import WorkflowIn
from conveyor.api.state import ApiState
from conveyor.config import WORKFLOW_TASK
from conveyor.jobs import outbox, store
from conveyor.jobs import schedules as schedule_store
from conveyor.jobs.states import JobState
from conveyor.jobs.store import workflows as flows
from conveyor.observability import logs
from conveyor.tasks import registry
from conveyor.tasks.submission import Origin, build_new_job, build_steps

log = logs.get(__name__)
router = APIRouter(prefix="/ui", include_in_schema=False)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if not target or not target.startswith("/ui") or target.startswith("//") or "\\" in target:
        return "/ui/"
    return target


def _set_cookie(response: Response, request: Request, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _login_form(
    request: Request, auth: Any, target: str, error: str | None, status: int
) -> Response:
    cookie, token = auth.signer().login_cookie()
    response = page("login.html", status=status, viewer=None, token=token, next=target, error=error)
    _set_cookie(response, request, LOGIN_COOKIE, cookie, LOGIN_SECONDS)
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, auth: Auth, _state: State, next: str = "/ui/") -> Response:
    """The sign-in form: one field, an API key."""
    return await run_in_threadpool(_login_form, request, auth, safe_next(next), None, 200)


@router.post("/login")
async def login(request: Request, auth: Auth, _state: State) -> Response:
    """Check the key; on success set the session cookie and go where the person was going."""
    try:
        form = parse_form(await request.body())
    except FormError as error:
        return problem_page(None, Problem(400, str(error)))
    signer = await run_in_threadpool(auth.signer)
    nonce = signer.login_nonce(request.cookies.get(LOGIN_COOKIE))
    if nonce is None or not tokens_match(signer.login_token(nonce), form.get(CSRF_FIELD)):
        raise CsrfRefused()
    target = safe_next(form.get("next"))
    key = await run_in_threadpool(auth.sign_in, form.get("key", ""))
    if key is None:
        message = "That key is unknown, revoked, or may not read."
        return await run_in_threadpool(_login_form, request, auth, target, message, 401)
    cookie, _session = signer.issue(key.id)
    log.info("console sign-in", key=key.prefix, tenant=key.tenant)
    response = RedirectResponse(target, status_code=303)
    _set_cookie(response, request, COOKIE, cookie, int(signer.session_seconds))
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
async def logout(request: Request, _state: State) -> Response:
    """End the session (the CSRF token is needed here too)."""
    auth = console_auth(request)
    signer = await run_in_threadpool(auth.signer)
    session = signer.read(request.cookies.get(COOKIE))
    try:
        form = parse_form(await request.body())
    except FormError:
        form = {}
    if session is not None and not tokens_match(signer.csrf_token(session), form.get(CSRF_FIELD)):
        raise CsrfRefused()
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


async def _act(viewer: Viewer, action: Any, *args: Any) -> Response | None:
    """Run a route's code as the viewer; a Problem it raises comes back as a page."""
    try:
        await run_in_threadpool(action, *args)
    except Problem as problem:
        return problem_page(viewer, problem)
    return None


def _back(path: str, done: str, **extra: str) -> Response:
    query = "&".join([f"done={done}", *(f"{k}={quote(v)}" for k, v in extra.items())])
    return RedirectResponse(f"{path}?{query}", status_code=303)


@router.post("/jobs/{job_id}/retry")
async def retry_job(job_id: uuid.UUID, actor: Actor, state: State) -> Response:
    """Queue a dead or cancelled job again."""
    viewer, _form = actor
    refused = await _act(viewer, jobs.retry_job, job_id, viewer.key, state)
    return refused or _back(f"/ui/jobs/{job_id}", "retried")


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: uuid.UUID, actor: Actor, state: State) -> Response:
    """Cancel an unfinished job; a running one is stopped within seconds."""
    viewer, _form = actor
    refused = await _act(viewer, jobs.cancel_job, job_id, viewer.key, state)
    return refused or _back(f"/ui/jobs/{job_id}", "cancelled")


def _group_ids(state: ApiState, viewer: Viewer, form: dict[str, str]) -> list[uuid.UUID]:
    with state.sessions() as session:
        dead = store.list_dead(
            session,
            tenant=viewer.tenant,
            task=form.get("task") or None,
            error_type=form.get("error_type") or None,
            limit=dead_letters.REPLAY_LIMIT,
        )
    fingerprint = form.get("fingerprint")
    return [job.id for job in dead if not fingerprint or job.error_fingerprint == fingerprint]


@router.post("/dead-letters/replay")
async def replay(actor: Actor, state: State) -> Response:
    """Queue again one dead job (`id`) or a group (`task`, `error_type`, `fingerprint`)."""
    viewer, form = actor
    try:
        ids = (
            [uuid.UUID(form["id"])]
            if form.get("id")
            else await run_in_threadpool(_group_ids, state, viewer, form)
        )
    except ValueError:
        return problem_page(viewer, Problem(422, "not a job id"))
    try:
        body = dead_letters.ReplayIn(ids=ids)
        out = await run_in_threadpool(dead_letters.replay_dead_letters, body, viewer.key, state)
    except Problem as problem:
        return problem_page(viewer, problem)
    return _back("/ui/dead-letters", "replayed", count=str(out.replayed))


@router.post("/dead-letters/{job_id}/discard")
async def discard(job_id: uuid.UUID, actor: Actor, state: State) -> Response:
    """Remove a dead job and its history for good."""
    viewer, _form = actor
    refused = await _act(viewer, dead_letters.delete_dead_letter, job_id, viewer.key, state)
    return refused or _back("/ui/dead-letters", "discarded")


async def _set_enabled(name: str, enabled: bool, viewer: Viewer, state: ApiState) -> Response:
    body = schedules.SchedulePatch(enabled=enabled)
    refused = await _act(viewer, schedules.patch_schedule, name, body, viewer.key, state)
    return refused or _back("/ui/schedules", "enabled" if enabled else "paused")


@router.post("/schedules/{name}/pause")
async def pause_schedule(name: str, actor: Actor, state: State) -> Response:
    """Stop a schedule firing until it is enabled again."""
    return await _set_enabled(name, False, actor[0], state)


@router.post("/schedules/{name}/enable")
async def enable_schedule(name: str, actor: Actor, state: State) -> Response:
    """Let a paused schedule fire again."""
    return await _set_enabled(name, True, actor[0], state)


def run_now(state: ApiState, tenant: str, name: str) -> None:
    """Fire a schedule once now, outside its timing: a run of its own, listed with its runs."""
    with state.sessions() as session:
        schedule = schedule_store.get_schedule(session, tenant, name)
    if schedule is None:
        raise Problem(404, f"no schedule {name!r}")
    origin = Origin.current()
    try:
        with state.sessions.begin() as session:
            tick = store.utcnow()
            if schedule.task == WORKFLOW_TASK:
                body = WorkflowIn.model_validate(schedule.payload)
                steps = build_steps(registry, body.steps, tenant=tenant, origin=origin)
                first = replace(
                    steps[0], job=replace(steps[0].job, schedule_id=schedule.id, schedule_tick=tick)
                )
                _, created = flows.create_workflow(
                    session,
                    tenant=tenant,
                    name=body.name or schedule.name,
                    tags=body.tags,
                    steps=[first, *steps[1:]],
                    now=tick,
                )
                ready = [job for job in created if job.state is JobState.QUEUED]
            else:
                new = build_new_job(
                    registry,
                    tenant=tenant,
                    task=schedule.task,
                    payload=schedule.payload,
                    priority=schedule.priority,
                    origin=origin,
                )
                new = replace(new, schedule_id=schedule.id, schedule_tick=tick)
                ready = [store.create_job(session, new, now=tick)]
    except Exception as error:  # the task type went away or its schema changed
        raise Problem(409, f"schedule {name!r} cannot fire: {error}") from None
    outbox.publish_recorded(state.sessions, state.publisher, ready)


@router.post("/schedules/{name}/run")
async def run_schedule(name: str, actor: Actor, state: State) -> Response:
    """Fire the schedule once, now."""
    viewer, _form = actor
    refused = await _act(viewer, run_now, state, viewer.tenant, name)
    return refused or _back("/ui/schedules", "ran")


@router.post("/workflows/{workflow_id}/cancel")
async def cancel_workflow(workflow_id: uuid.UUID, actor: Actor, state: State) -> Response:
    """Cancel every unfinished step of a workflow."""
    viewer, _form = actor
    refused = await _act(viewer, workflows.cancel_workflow, workflow_id, viewer.key, state)
    return refused or _back(f"/ui/workflows/{workflow_id}", "workflow-cancelled")
