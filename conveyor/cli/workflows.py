"""`conveyor workflows`: submit a workflow from a JSON file, show one as a tree of steps,
list them, cancel one. Over the job store directly, like the other one-shot commands."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conveyor.api.schemas import WorkflowIn
from conveyor.cli.consumers import ConsumerWatch
from conveyor.cli.errors import CommandError
from conveyor.cli.tables import print_table
from conveyor.cli.wiring import command_platform, sessions_for
from conveyor.config import Settings
from conveyor.jobs import outbox
from conveyor.jobs.states import JobState
from conveyor.jobs.store import workflows as flows
from conveyor.tasks import registry
from conveyor.tasks.submission import StepError, build_steps


def _where(loc: Any) -> str:
    return ".".join(str(part) for part in loc)


def read_workflow(path: str) -> WorkflowIn:
    """The workflow a JSON file describes (POST /v1/workflows' body), checked whole."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not valid JSON: {error.msg} (line {error.lineno})") from None
    try:
        return WorkflowIn.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        raise CommandError(f"{path}: {_where(first['loc'])}: {first['msg']}") from None


def new_steps(body: WorkflowIn, tenant: str) -> list[flows.NewStep]:
    """Every step checked (the graph, then each task and payload): one line for the first
    thing wrong."""
    try:
        return build_steps(registry, body.steps, tenant=tenant)
    except StepError as error:
        first = error.errors[0]
        if error.slug == "invalid-payload":
            raise CommandError(f"steps.{_where(first['loc'])}: {first['msg']}") from None
        raise CommandError(f"steps.{_where(error.loc)}: {error.message}") from None


def submit(settings: Settings, path: str, tenant: str, wait: bool, timeout: float) -> int:
    """Record the workflow and publish its first steps; with `wait`, show it once finished
    (exit 0 when it succeeded, 1 otherwise)."""
    body = read_workflow(path)
    steps = new_steps(body, tenant)
    platform = command_platform(settings)
    with platform.sessions.begin() as session:
        workflow, jobs = flows.create_workflow(
            session, tenant=tenant, name=body.name, tags=body.tags, steps=steps
        )
    ready = [job for job in jobs if job.state is JobState.QUEUED]
    outbox.publish_recorded(platform.sessions, platform.publisher, ready)
    if not wait:
        print(workflow.id)
        return 0
    deadline = time.monotonic() + timeout
    queue = ready[0].queue if ready else "default"
    watch = ConsumerWatch(platform, queue, f"workflow {workflow.id}")
    while time.monotonic() < deadline:
        with platform.sessions() as session:
            current = flows.get_workflow(session, workflow.id, steps=True)
        assert current is not None
        watch.check(started=any(step.attempts for step in current.steps))
        if current.finished:
            print(tree(current))
            return 0 if current.state == "succeeded" else 1
        time.sleep(0.1)
    raise CommandError(f"workflow {workflow.id} did not finish within {timeout:g}s")


def tree(workflow: flows.Workflow) -> str:
    """The workflow and its steps, each indented below the deepest step it runs after."""
    depth: dict[str, int] = {}
    for step in workflow.steps:  # parents are given before their children
        depth[step.key] = 1 + max((depth.get(p, 0) for p in step.after), default=-1)
    width = max((len(s.key) + 2 * depth[s.key] for s in workflow.steps), default=0)
    title = f" {workflow.name}" if workflow.name else ""
    lines = [f"workflow {workflow.id}{title}: {workflow.state} ({workflow.steps_total} steps)"]
    for step in workflow.steps:
        name = ("  " * depth[step.key] + step.key).ljust(width)
        after = f"  after {', '.join(step.after)}" if step.after else ""
        lines.append(
            f"  {name}  {step.state.value:<9}  {step.task:<16}  attempts {step.attempts}{after}"
        )
    return "\n".join(lines)


def _workflow_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CommandError(f"not a workflow id: {text!r}") from None


def show(settings: Settings, workflow_id: str) -> None:
    """Print a workflow as a tree of its steps."""
    with sessions_for(settings)() as session:
        workflow = flows.get_workflow(session, _workflow_id(workflow_id), steps=True)
    if workflow is None:
        raise CommandError(f"no workflow {workflow_id}")
    print(tree(workflow))


def listing(settings: Settings, tenant: str, state: str | None, limit: int) -> None:
    """Print a tenant's workflows newest first, one line each."""
    with sessions_for(settings)() as session:
        found = flows.list_workflows_page(session, tenant=tenant, state=state, limit=limit)
    print_table(
        ["ID", "STATE", "STEPS", "CREATED", "NAME"],
        [
            (
                w.id,
                w.state,
                f"{w.steps_total - w.steps_left}/{w.steps_total}",
                w.created_at.isoformat(),
                w.name,
            )
            for w in found
        ],
    )


def cancel(settings: Settings, workflow_id: str) -> None:
    """Cancel every unfinished step of a workflow."""
    with sessions_for(settings).begin() as session:
        before = flows.get_workflow(session, _workflow_id(workflow_id))
        if before is None:
            raise CommandError(f"no workflow {workflow_id}")
        if before.finished:
            raise CommandError(f"workflow {workflow_id} has finished ({before.state})")
        flows.cancel_workflow(session, before.id)
    print(f"{workflow_id} cancelled")
