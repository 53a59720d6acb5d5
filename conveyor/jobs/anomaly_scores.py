"""Scoring for anomaly detection: signals, measures over rollup minutes, robust z-scores.

Pure functions over plain values; `anomalies` loads the minutes, scores them with these
and keeps the episodes. How the scores are judged is told in `anomalies`' docstring.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from conveyor.jobs import quantiles
from conveyor.jobs.rollups import MINUTE

# Scales a MAD to the standard deviation of a normal distribution (the 0.75 quantile).
MAD_TO_SIGMA = 0.6745


class Signal(StrEnum):
    """What is watched per task type."""

    FAILURE_RATE = "failure_rate"
    RUN_P95 = "run_p95"
    WAIT_P95 = "wait_p95"


@dataclass(frozen=True, slots=True)
class Floor:
    """The least MAD a baseline is taken to have: `absolute`, or `relative` * |median|."""

    absolute: float
    relative: float

    def apply(self, mad: float, median: float) -> float:
        """The MAD to divide by."""
        return max(mad, self.absolute, self.relative * abs(median))


# With the default open score of 3.5, over a flat baseline a signal must rise by about
# 5.2 * the floor: five points of failure rate (or half again the rate), a quarter of
# the p95 (two or three 10 % histogram buckets), and at least 50 ms of run time or half
# a second of queue wait, which short jobs and an idle queue jitter by anyway.
FLOORS: Mapping[Signal, Floor] = {
    Signal.FAILURE_RATE: Floor(absolute=0.01, relative=0.1),
    Signal.RUN_P95: Floor(absolute=0.01, relative=0.05),
    Signal.WAIT_P95: Floor(absolute=0.1, relative=0.05),
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Every threshold of detection; the defaults suit rollups of one-minute rows.

    `window_minutes`: the stretch judged, and the length of each baseline point.
    `baseline_minutes`: how far back before the window the baseline reaches.
    `min_samples`: jobs a window (or a baseline stretch) must rest on to count.
    `min_baseline_points`: baseline stretches needed; with the defaults, 20 of the 56,
    so about 25 minutes of history with enough jobs.
    `open_score`, `close_score`: the robust z-score opening an episode, and the one it
    must fall below to end.
    `stale_minutes`: how long an open episode lasts without its signal being scored.
    `max_lag_minutes`: detection waits while aggregation catches up from further behind,
    rather than judge old windows.
    """

    window_minutes: int = 5
    baseline_minutes: int = 60
    min_samples: int = 20
    min_baseline_points: int = 20
    open_score: float = 3.5
    close_score: float = 2.0
    stale_minutes: int = 15
    max_lag_minutes: int = 3
    floors: Mapping[Signal, Floor] = field(default_factory=lambda: dict(FLOORS))


@dataclass(frozen=True, slots=True)
class MinuteSample:
    """What one rollup minute says of a task type: outcomes and duration histograms."""

    succeeded: int = 0
    dead: int = 0
    runs: Counter[int] = field(default_factory=Counter)
    waits: Counter[int] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Measure:
    """One signal over a stretch of minutes: its value (None without jobs) and its jobs."""

    value: float | None
    samples: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """A scored signal: the window's value, the baseline's median and the robust z-score."""

    signal: Signal
    value: float
    baseline: float
    score: float


Action = Literal["open", "extend", "end", "keep", "none"]


def measure(signal: Signal, minutes: Iterable[MinuteSample]) -> Measure:
    """A signal over some minutes, pooled: their jobs together, not an average of minutes."""
    stretch = list(minutes)
    if signal is Signal.FAILURE_RATE:
        dead = sum(m.dead for m in stretch)
        finished = dead + sum(m.succeeded for m in stretch)
        return Measure(dead / finished if finished else None, finished)
    merged = quantiles.merge([m.runs if signal is Signal.RUN_P95 else m.waits for m in stretch])
    return Measure(quantiles.from_histogram(merged).p95, sum(merged.values()))


def baseline_points(
    signal: Signal, minutes: Sequence[MinuteSample], *, width: int, min_samples: int
) -> list[float]:
    """The signal over every `width`-minute stretch of `minutes` resting on enough jobs."""
    points = []
    for start in range(len(minutes) - width + 1):
        found = measure(signal, minutes[start : start + width])
        if found.value is not None and found.samples >= min_samples:
            points.append(found.value)
    return points


def chance_mad(signal: Signal, median: float, samples: int) -> float:
    """The MAD that chance alone gives the signal over `samples` jobs; 0 without a model.

    A failure rate p over n jobs varies by sqrt(p(1 - p) / n). The rate is taken as at
    least 1/n, so a few failures of a task type that never failed stay within chance.
    """
    if signal is not Signal.FAILURE_RATE or samples <= 0:
        return 0.0
    rate = max(median, 1 / samples)
    return MAD_TO_SIGMA * math.sqrt(rate * (1 - rate) / samples)


def median_and_mad(points: Sequence[float]) -> tuple[float, float]:
    """The median of `points` and their median absolute deviation from it."""
    median = statistics.median(points)
    return median, statistics.median(abs(point - median) for point in points)


def robust_z(value: float, median: float, mad: float) -> float:
    """0.6745 * (value - median) / MAD: about how many standard deviations out `value` is."""
    return MAD_TO_SIGMA * (value - median) / mad


def score_signal(signal: Signal, minutes: Sequence[MinuteSample], limits: Limits) -> Verdict | None:
    """The latest window of `minutes` (oldest first) against the minutes before it.

    None when the window or the baseline rests on too few jobs to say anything.
    """
    width = limits.window_minutes
    current = measure(signal, minutes[-width:])
    if current.value is None or current.samples < limits.min_samples:
        return None
    points = baseline_points(signal, minutes[:-width], width=width, min_samples=limits.min_samples)
    if len(points) < limits.min_baseline_points:
        return None
    median, mad = median_and_mad(points)
    # Neither a flat baseline nor one quieter than chance allows makes small changes large.
    mad = max(limits.floors[signal].apply(mad, median), chance_mad(signal, median, current.samples))
    score = robust_z(current.value, median, mad)
    return Verdict(signal=signal, value=current.value, baseline=median, score=score)


def score_task(minutes: Sequence[MinuteSample], limits: Limits) -> dict[Signal, Verdict]:
    """Every signal of one task type that could be scored."""
    verdicts = {signal: score_signal(signal, minutes, limits) for signal in Signal}
    return {signal: v for signal, v in verdicts.items() if v is not None}


def decide(
    verdict: Verdict | None,
    last_seen_at: dt.datetime | None,
    *,
    now: dt.datetime,
    limits: Limits,
) -> Action:
    """What to do with one signal's episode; `last_seen_at` is None when none is open."""
    if last_seen_at is None:
        return "open" if verdict is not None and verdict.score >= limits.open_score else "none"
    if verdict is None:
        stale = now - last_seen_at >= limits.stale_minutes * MINUTE
        return "end" if stale else "keep"
    return "extend" if verdict.score >= limits.close_score else "end"
