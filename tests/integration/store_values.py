"""Fixed times, names and new jobs shared by the job store's test modules."""

from __future__ import annotations

import datetime as dt
from typing import Any

from conveyor.jobs.models import JobError, NewJob

T0 = dt.datetime(2031, 3, 4, 12, 0, 0, tzinfo=dt.UTC)
WORKER = "worker-a@host"
OTHER_WORKER = "worker-b@host"
TENANT = "acme"
ERROR = JobError("ValueError", "boom", "Traceback ...", "f" * 64)


def at(seconds: float) -> dt.datetime:
    """T0 plus some seconds."""
    return T0 + dt.timedelta(seconds=seconds)


def new_job(**overrides: Any) -> NewJob:
    """A new job of the demo type for TENANT, with `overrides`."""
    values: dict[str, Any] = {
        "tenant": TENANT,
        "task": "demo.echo",
        "payload": {"n": 1, "nested": {"list": [1, 2, 3]}},
        "priority": "default",
        "queue": "default",
        "max_attempts": 3,
        "timeout_seconds": 60.0,
        "tags": ["a", "b"],
    }
    values.update(overrides)
    return NewJob(**values)
