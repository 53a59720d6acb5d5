"""A pool's cap on run time, applied to messages that carry their own time limits.

Celery takes a message's own `timelimit` header over the worker's `--time-limit`, and
every `conveyor.run` message carries its job's timeout, so a pool-wide cap has to lower
the limits each request arrives with.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

# The hard limit (the process is killed) comes this long after the soft one (an exception
# in the task), as the publisher does for a job's own timeout.
HARD_LIMIT_GRACE_SECONDS = 10.0


def capped_limits(
    limits: tuple[float | None, float | None] | list[float | None] | None, cap: float
) -> tuple[float, float]:
    """(hard, soft) limits no longer than `cap` (soft) and `cap` + grace (hard)."""
    hard, soft = limits if limits else (None, None)
    soft_cap, hard_cap = cap, cap + HARD_LIMIT_GRACE_SECONDS
    return (min(hard, hard_cap) if hard else hard_cap, min(soft, soft_cap) if soft else soft_cap)


def capped_request_class(cap: float) -> type[Request]:
    """A Request class whose time limits are at most the pool's cap."""

    class CappedRequest(Request):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The message's own (hard, soft) limits, set by Request from its headers.
            own = getattr(self, "time_limits", None)
            self.time_limits = capped_limits(own, cap)

    return CappedRequest
