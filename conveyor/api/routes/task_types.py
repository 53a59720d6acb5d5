"""/v1/task-types: what can be submitted, with defaults and payload schemas."""

from __future__ import annotations

from fastapi import APIRouter

from conveyor.api.deps import Reader
from conveyor.api.routes.jobs import PROBLEMS
from conveyor.api.schemas import TaskTypeOut, TaskTypesOut
from conveyor.tasks import registry

router = APIRouter(prefix="/v1/task-types", tags=["task types"])


@router.get("", response_model=TaskTypesOut, responses=PROBLEMS)
def list_task_types(_key: Reader) -> TaskTypesOut:
    """Every registered task type with its default priority, attempts, timeout and schema."""
    return TaskTypesOut(
        items=[
            TaskTypeOut(
                name=t.name,
                description=t.description,
                priority=t.priority,
                max_attempts=t.max_attempts,
                timeout_seconds=t.timeout_seconds,
                payload_schema=t.json_schema(),
            )
            for t in registry.all()
        ]
    )
