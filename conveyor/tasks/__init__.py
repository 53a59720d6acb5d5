"""Task types: the registry and the built-in types."""

from conveyor.tasks import demo, webhook
from conveyor.tasks.registry import (
    PermanentError,
    RetryableError,
    TaskContext,
    TaskType,
    UnknownTask,
    registry,
)

__all__ = [
    "PermanentError",
    "RetryableError",
    "TaskContext",
    "TaskType",
    "UnknownTask",
    "demo",
    "registry",
    "webhook",
]
