"""Workflows in code: steps, and `chain` and `group` to say which run after which.

    from conveyor.client import chain, group, step

    flow = chain(
        step("fetch", "demo.echo", {"url": "https://example.com"}),
        group(step("resize", "demo.echo"), step("scan", "demo.echo")),
        step("report", "demo.collect"),
    )
    workflow = conveyor.workflow(flow, name="upload")

`chain(a, b, c)` runs each part after the whole of the one before (a fan-in where a part
ends in several steps, a fan-out where the next begins with several); `group(...)` runs
its parts side by side; `step(..., run_if="finished")` runs once its parents have ended,
whatever their outcome. A flow is a value: the same one may be submitted many times.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from conveyor.client.results import _time


@dataclass(frozen=True)
class StepSpec:
    """One step of a flow, as POST /v1/workflows takes it."""

    key: str
    task: str
    payload: Any = None
    after: tuple[str, ...] = ()
    run_if: str = "succeeded"
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The step in the request body."""
        body: dict[str, Any] = {
            "key": self.key,
            "task": self.task,
            "payload": {} if self.payload is None else self.payload,
            "after": list(self.after),
            "run_if": self.run_if,
        }
        body.update({k: v for k, v in self.options.items() if v is not None})
        return body


@dataclass(frozen=True)
class Flow:
    """Steps, with those a following part runs after (`tails`) and those that run after a
    preceding part (`heads`)."""

    steps: tuple[StepSpec, ...]
    heads: tuple[str, ...]
    tails: tuple[str, ...]

    def then(self, *parts: Flow) -> Flow:
        """This flow, then the parts one after the other: `chain(self, *parts)`."""
        return chain(self, *parts)

    def to_json(self) -> list[dict[str, Any]]:
        """The steps in the request body."""
        return [s.to_json() for s in self.steps]


def step(
    key: str, task: str, payload: Any = None, *, run_if: str = "succeeded", **options: Any
) -> Flow:
    """One step; options are `priority`, `max_attempts`, `timeout_seconds` and `tags`."""
    spec = StepSpec(key, task, payload, (), run_if, dict(options))
    return Flow((spec,), (key,), (key,))


def chain(*parts: Flow) -> Flow:
    """The parts one after the other: each part's first steps run after the previous
    part's last ones."""
    if not parts:
        raise ValueError("a chain needs at least one part")
    steps = list(parts[0].steps)
    for before, part in itertools.pairwise(parts):
        steps.extend(
            replace(s, after=(*s.after, *before.tails)) if s.key in part.heads else s
            for s in part.steps
        )
    return Flow(tuple(steps), parts[0].heads, parts[-1].tails)


def group(*parts: Flow) -> Flow:
    """The parts side by side: a following part runs after all of them."""
    if not parts:
        raise ValueError("a group needs at least one part")
    return Flow(
        tuple(s for p in parts for s in p.steps),
        tuple(k for p in parts for k in p.heads),
        tuple(k for p in parts for k in p.tails),
    )


def steps_of(flow: Flow | Sequence[StepSpec | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The request's steps from a flow, or from steps given one by one."""
    if isinstance(flow, Flow):
        return flow.to_json()
    return [s.to_json() if isinstance(s, StepSpec) else dict(s) for s in flow]


@dataclass(frozen=True)
class WorkflowStep:
    """A step of a recorded workflow: its job, task, state, parents and attempts."""

    key: str
    job_id: uuid.UUID
    task: str
    state: str
    after: list[str]
    attempts: int


@dataclass(frozen=True)
class Workflow:
    """A workflow as the API shows it."""

    id: uuid.UUID
    name: str | None
    state: str
    tags: list[str]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    steps: list[WorkflowStep]

    @property
    def finished(self) -> bool:
        """Whether every step has finished (the state is then final until a retry)."""
        return self.finished_at is not None

    def step(self, key: str) -> WorkflowStep:
        """The step with this key (KeyError when there is none)."""
        for found in self.steps:
            if found.key == key:
                return found
        raise KeyError(key)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Workflow:
        """The workflow of an API answer."""
        created = _time(data["created_at"])
        assert created is not None
        return cls(
            id=uuid.UUID(data["id"]),
            name=data.get("name"),
            state=data["state"],
            tags=list(data.get("tags") or []),
            created_at=created,
            finished_at=_time(data.get("finished_at")),
            steps=[
                WorkflowStep(
                    s["key"],
                    uuid.UUID(s["job_id"]),
                    s["task"],
                    s["state"],
                    list(s["after"]),
                    s["attempts"],
                )
                for s in data.get("steps", [])
            ],
        )
