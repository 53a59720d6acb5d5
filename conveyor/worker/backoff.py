"""Retry delays: exponential, with jitter that never lets a delay shrink."""

from __future__ import annotations

import random

JITTER = 0.25


def retry_delay(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based).

    The step doubles with each attempt up to `cap`; the delay is drawn from the top
    quarter of the step. Workers failing together spread out, and below the cap every
    delay is at least 1.5 times the longest the previous one could have been.
    """
    step = min(cap, base * 2 ** max(0, attempt - 1))
    return float(step * (1.0 - JITTER * (rng or random).random()))
