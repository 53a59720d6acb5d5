"""Anomalies: task types whose failure rate, run time or queue wait leaves their own baseline.

`detect` runs after each aggregation, over the rollups only. For every tenant and task
type it measures three signals over the latest window (the last `window_minutes`
rolled-up minutes, ending at the aggregation watermark):

- `failure_rate`: dead jobs over the jobs that finished succeeded or dead (the rollups
  count terminal states; cancelled jobs say nothing about the task and are left out);
- `run_p95`: the 95th percentile of run time of succeeded jobs, in seconds;
- `wait_p95`: the 95th percentile of queue wait of started jobs, in seconds.

Each is compared with the same measure over every `window_minutes` stretch of the
`baseline_minutes` before the window (sliding one minute at a time), so the baseline's
points are as noisy as the window's value and comparable with it. The comparison is a
robust z-score, 0.6745 · (value - median) / MAD, which a few odd minutes in the baseline
do not move. The MAD has a floor, per signal an absolute amount or a share of the median,
whichever is larger: a perfectly flat baseline would otherwise make any change infinite.
A failure rate's MAD is also at least what binomial sampling of the window's jobs gives,
so a baseline quieter than chance does not make chance look like an anomaly. Even so, a
steady task type's failure count over the window reaches 3.5 of its own standard
deviations about once in a thousand windows by chance (a count is skewed upwards).

A signal is scored only when the window rests on at least `min_samples` jobs and the
baseline has at least `min_baseline_points` stretches that do too; a rare task type's
single failure is no anomaly. Only the bad direction counts (more failures, slower).

An episode opens (one row in `anomalies`, one warning in the log) when the score reaches
`open_score`; while it stays at or above `close_score` the row is brought up to date and
nothing is logged; below that the episode ends (one info line). The gap between the two
scores keeps a signal hovering at the threshold from opening an episode every run. A
signal that can no longer be scored (its jobs stopped) ends after `stale_minutes`
without a sighting. The baseline is the task type's own recent past: a lasting change
becomes its new normal once it fills about half the baseline, and the episode ends.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import statistics
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from sqlalchemy import RowMapping, insert, select, update
from sqlalchemy.orm import Session

from conveyor.jobs import quantiles
from conveyor.jobs.rollups import MINUTE, watermark
from conveyor.jobs.states import JobState
from conveyor.jobs.store.locks import try_transaction_lock
from conveyor.jobs.tables import anomalies, job_rollups

log = logging.getLogger(__name__)

# Scales a MAD to the standard deviation of a normal distribution (the 0.75 quantile).
MAD_TO_SIGMA = 0.6745
# pg_try_advisory_xact_lock key of detection: two concurrent runs would open an episode twice.
_LOCK_KEY = 0x616E6F6D616C79  # "anomaly"


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


@dataclass(frozen=True, slots=True)
class Episode:
    """One stored episode of a signal out of its baseline."""

    id: uuid.UUID
    tenant: str
    task: str
    signal: Signal
    value: float
    baseline: float
    score: float
    started_at: dt.datetime
    last_seen_at: dt.datetime
    ended_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Detection:
    """What one detection run did: episodes opened, carried on and ended."""

    opened: int = 0
    ongoing: int = 0
    ended: int = 0


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


def _sample(row: RowMapping) -> MinuteSample:
    counts = row["counts"] or {}
    return MinuteSample(
        succeeded=int(counts.get(JobState.SUCCEEDED.value, 0)),
        dead=int(counts.get(JobState.DEAD.value, 0)),
        runs=quantiles.histogram_from_json(row["run_histogram"]),
        waits=quantiles.histogram_from_json(row["wait_histogram"]),
    )


def load_minutes(
    session: Session, *, end: dt.datetime, minutes: int
) -> dict[tuple[str, str], list[MinuteSample]]:
    """Per (tenant, task): the `minutes` rollup minutes before `end`, oldest first.

    A minute without a row (no job finished) is an empty sample, so positions line up.
    """
    start = end - minutes * MINUTE
    query = select(
        job_rollups.c.tenant,
        job_rollups.c.task,
        job_rollups.c.minute,
        job_rollups.c.counts,
        job_rollups.c.run_histogram,
        job_rollups.c.wait_histogram,
    ).where(job_rollups.c.minute >= start, job_rollups.c.minute < end)
    series: dict[tuple[str, str], list[MinuteSample]] = {}
    for row in session.execute(query).mappings():
        slots = series.setdefault((row["tenant"], row["task"]), [MinuteSample()] * minutes)
        slots[int((row["minute"] - start) / MINUTE)] = _sample(row)
    return series


def _episode(row: RowMapping) -> Episode:
    return Episode(
        id=row["id"],
        tenant=row["tenant"],
        task=row["task"],
        signal=Signal(row["signal"]),
        value=row["value"],
        baseline=row["baseline"],
        score=row["score"],
        started_at=row["started_at"],
        last_seen_at=row["last_seen_at"],
        ended_at=row["ended_at"],
    )


def open_episodes(session: Session, *, tenant: str | None = None) -> list[Episode]:
    """Episodes still open, of one tenant or of all, by task type and signal."""
    query = select(anomalies).where(anomalies.c.ended_at.is_(None))
    if tenant is not None:
        query = query.where(anomalies.c.tenant == tenant)
    query = query.order_by(anomalies.c.tenant, anomalies.c.task, anomalies.c.signal)
    return [_episode(row) for row in session.execute(query).mappings()]


def open_anomalies(session: Session) -> list[tuple[str, str]]:
    """(task, signal) of every open episode across tenants, once each: a gauge's labels."""
    query = (
        select(anomalies.c.task, anomalies.c.signal)
        .where(anomalies.c.ended_at.is_(None))
        .distinct()
        .order_by(anomalies.c.task, anomalies.c.signal)
    )
    return [(task, signal) for task, signal in session.execute(query)]


def _start_episode(
    session: Session, tenant: str, task: str, verdict: Verdict, now: dt.datetime
) -> None:
    session.execute(
        insert(anomalies).values(
            id=uuid.uuid4(),
            tenant=tenant,
            task=task,
            signal=verdict.signal.value,
            started_at=now,
            last_seen_at=now,
            ended_at=None,
            value=verdict.value,
            baseline=verdict.baseline,
            score=verdict.score,
        )
    )
    log.warning(
        "anomaly started: tenant=%s task=%s signal=%s value=%.6g baseline=%.6g score=%.2f",
        tenant,
        task,
        verdict.signal.value,
        verdict.value,
        verdict.baseline,
        verdict.score,
    )


def _extend_episode(session: Session, episode: Episode, verdict: Verdict, now: dt.datetime) -> None:
    session.execute(
        update(anomalies)
        .where(anomalies.c.id == episode.id)
        .values(
            last_seen_at=now, value=verdict.value, baseline=verdict.baseline, score=verdict.score
        )
    )


def _end_episode(
    session: Session, episode: Episode, verdict: Verdict | None, now: dt.datetime
) -> None:
    session.execute(update(anomalies).where(anomalies.c.id == episode.id).values(ended_at=now))
    how = (
        "no longer measured"
        if verdict is None
        else f"value={verdict.value:.6g} baseline={verdict.baseline:.6g} score={verdict.score:.2f}"
    )
    log.info(
        "anomaly ended: tenant=%s task=%s signal=%s after %ds, %s",
        episode.tenant,
        episode.task,
        episode.signal.value,
        (now - episode.started_at).total_seconds(),
        how,
    )


def _apply(
    session: Session,
    key: tuple[str, str, Signal],
    verdict: Verdict | None,
    episode: Episode | None,
    *,
    now: dt.datetime,
    limits: Limits,
) -> Action:
    action = decide(
        verdict, None if episode is None else episode.last_seen_at, now=now, limits=limits
    )
    if action == "open" and verdict is not None:
        _start_episode(session, key[0], key[1], verdict, now)
    elif action == "extend" and episode is not None and verdict is not None:
        _extend_episode(session, episode, verdict, now)
    elif action == "end" and episode is not None:
        _end_episode(session, episode, verdict, now)
    return action


def detect(session: Session, *, now: dt.datetime, limits: Limits | None = None) -> Detection:
    """Score every task type's latest window, opening, updating and ending episodes.

    The caller owns the transaction. Nothing happens while another detection holds the
    lock, before the first aggregation, or while aggregation is catching up.
    """
    limits = limits or Limits()
    end = watermark(session)
    if (
        end is None
        or now - end > limits.max_lag_minutes * MINUTE
        or not try_transaction_lock(session, _LOCK_KEY)
    ):
        return Detection()
    series = load_minutes(session, end=end, minutes=limits.baseline_minutes + limits.window_minutes)
    verdicts = {
        (tenant, task, signal): verdict
        for (tenant, task), minutes in series.items()
        for signal, verdict in score_task(minutes, limits).items()
    }
    episodes = {(e.tenant, e.task, e.signal): e for e in open_episodes(session)}
    done: Counter[Action] = Counter()
    for key in sorted(verdicts.keys() | episodes.keys()):
        done[
            _apply(session, key, verdicts.get(key), episodes.get(key), now=now, limits=limits)
        ] += 1
    return Detection(opened=done["open"], ongoing=done["extend"] + done["keep"], ended=done["end"])
