"""Retry delays: exponential, with jitter that never lets a delay shrink."""

from __future__ import annotations

import random


def retry_delay(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based).

    Equal jitter: half of the exponential step is fixed and half is random, so
    workers failing together spread out, and each delay is at least as long as
    the longest the previous one could have been.
    """
    step = min(cap, base * 2 ** max(0, attempt - 1))
    draw = (rng or random).uniform(0.0, step / 2)
    return float(step / 2 + draw)
