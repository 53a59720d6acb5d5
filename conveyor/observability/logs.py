"""Structured logs: one JSON object per line, or readable lines on a terminal.

Every record, from Conveyor, Celery, uvicorn or any library using `logging`, goes
through the same structlog processors, so it carries the context bound to the current
thread or task: `request_id` and `trace_id` in the API; `job_id`, `task`, `attempt`,
`tenant`, `queue`, `trace_id` and `request_id` while a worker handles a job.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor

JOB_FIELDS = ("job_id", "task", "attempt", "tenant", "queue", "trace_id", "request_id")


# Celery's loggers of one line per task: a message received, a task finished.
PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")
# Lines of starting up and of each maintenance tick (beat sending its due tasks, a
# consumer connecting, Alembic loading its plugins, uvicorn starting): kept for DEBUG,
# so INFO shows what a person watches for: jobs failing, the platform's health.
QUIET_LOGGERS = (
    "alembic",
    "celery.beat",
    "celery.worker.consumer",
    "celery.apps.worker",
    "celery.bootsteps",
    "uvicorn.error",
)
# kombu warns of this for every connection to the in-process broker, which has no host.
_NO_HOST = "No hostname was supplied"


class _DropNoHost(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_HOST)


def setup(level: str, fmt: str = "auto", service: str = "conveyor") -> None:
    """Route all logging of this process through structlog at `level`."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    def stamp(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        event.setdefault("pid", os.getpid())
        if service:
            event["service"] = service
        return event

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        stamp,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The console renderer lays out exceptions itself.
            *([structlog.processors.format_exc_info] if use_json else []),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Celery writes two INFO lines per task (received, succeeded) beside Conveyor's own
    # per-job lines, which carry more: they are kept for DEBUG.
    chatty = logging.DEBUG if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in (*PER_TASK_LOGGERS, *QUIET_LOGGERS):
        logging.getLogger(name).setLevel(chatty)
    kombu = logging.getLogger("kombu.connection")
    if not any(isinstance(f, _DropNoHost) for f in kombu.filters):
        kombu.addFilter(_DropNoHost())


def bind(**values: Any) -> None:
    """Add fields to every following line of this thread or task."""
    structlog.contextvars.bind_contextvars(**values)


class _Bound:
    """The block of `bound`: the context variables it set are reset with their tokens
    (what structlog's own `bound_contextvars` does in two passes over every bound field)."""

    __slots__ = ("_tokens", "_values")

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values
        self._tokens: Mapping[str, contextvars.Token[Any]] = {}

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._values)

    def __exit__(self, *exc_info: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)


def bound(**values: Any) -> _Bound:
    """Fields on every line logged inside the block; the previous ones come back after.

    The block begins and ends in one thread or task, as every `with` block does.
    """
    return _Bound(values)


def current_request_id() -> str | None:
    """The id of the API request this thread or task is handling, if any."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return None if value is None else str(value)


def get(name: str) -> Any:
    """A logger taking fields as keywords; its records go to `logging` like any other."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.render_to_log_kwargs,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
