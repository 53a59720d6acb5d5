"""The task-type registry: what each task type accepts and how it runs by default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from conveyor.jobs.states import Priority


class TaskContext(Protocol):
    """What a running task may ask of the platform."""

    @property
    def job_id(self) -> str:
        """The id of the job being run; pass it downstream as an idempotency key."""
        ...

    @property
    def attempt(self) -> int:
        """The attempt number, from 1."""
        ...

    def cancelled(self) -> bool:
        """Whether the job was cancelled; long tasks poll this and stop early."""
        ...

    def set_progress(self, progress: Any) -> None:
        """Record progress that readers of the job see."""
        ...

    @property
    def parent_results(self) -> dict[str, Any]:
        """For a workflow step: its parents' results by their keys (succeeded ones only)."""
        ...


class PermanentError(Exception):
    """Raised by a task when retrying cannot help; the job goes dead at once."""


class RetryableError(Exception):
    """Raised by a task for a failure that another attempt may not repeat."""


Handler = Callable[[Any, TaskContext], Any]


@dataclass(frozen=True, slots=True)
class TaskType:
    """A registered task type."""

    name: str
    payload_model: type[BaseModel]
    handler: Handler
    priority: Priority = Priority.DEFAULT
    max_attempts: int = 3
    timeout_seconds: float = 300.0
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    description: str = ""

    def validate(self, payload: Any) -> BaseModel:
        """The payload as the task's model; raises pydantic's ValidationError."""
        return self.payload_model.model_validate(payload)

    def json_schema(self) -> dict[str, Any]:
        """The payload's JSON Schema."""
        return self.payload_model.model_json_schema()


class UnknownTask(LookupError):
    """No task type is registered under this name."""


class Registry:
    """Task types by name."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def add(self, task_type: TaskType) -> TaskType:
        """Register a task type; names are unique."""
        if task_type.name in self._types:
            raise ValueError(f"task type {task_type.name!r} is registered twice")
        self._types[task_type.name] = task_type
        return task_type

    def task(
        self,
        name: str,
        payload_model: type[BaseModel],
        **options: Any,
    ) -> Callable[[Handler], Handler]:
        """Decorator registering a handler as a task type."""

        def register(handler: Handler) -> Handler:
            description = (handler.__doc__ or "").strip().splitlines()
            self.add(
                TaskType(
                    name,
                    payload_model,
                    handler,
                    description=description[0] if description else "",
                    **options,
                )
            )
            return handler

        return register

    def get(self, name: str) -> TaskType:
        """The task type registered under `name`; raises UnknownTask."""
        try:
            return self._types[name]
        except KeyError:
            raise UnknownTask(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def all(self) -> list[TaskType]:
        """Every task type, by name."""
        return [self._types[name] for name in sorted(self._types)]


registry = Registry()

__all__ = [
    "PermanentError",
    "Registry",
    "RetryableError",
    "TaskContext",
    "TaskType",
    "UnknownTask",
    "ValidationError",
    "registry",
]
