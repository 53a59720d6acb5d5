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
import uuid
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import RowMapping, insert, select, update
from sqlalchemy.orm import Session

from conveyor.jobs import quantiles
from conveyor.jobs.anomaly_scores import (
    FLOORS,
    MAD_TO_SIGMA,
    Action,
    Floor,
    Limits,
    Measure,
    MinuteSample,
    Signal,
    Verdict,
    baseline_points,
    chance_mad,
    decide,
    measure,
    median_and_mad,
    robust_z,
    score_signal,
    score_task,
)
from conveyor.jobs.rollups import MINUTE, watermark
from conveyor.jobs.states import JobState
from conveyor.jobs.store.locks import try_transaction_lock
from conveyor.jobs.tables import anomalies, job_rollups

__all__ = [
    "FLOORS",
    "MAD_TO_SIGMA",
    "Action",
    "Detection",
    "Episode",
    "Floor",
    "Limits",
    "Measure",
    "MinuteSample",
    "Signal",
    "Verdict",
    "baseline_points",
    "chance_mad",
    "decide",
    "detect",
    "load_minutes",
    "measure",
    "median_and_mad",
    "open_anomalies",
    "open_episodes",
    "robust_z",
    "score_signal",
    "score_task",
]

log = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key of detection: two concurrent runs would open an episode twice.
_LOCK_KEY = 0x616E6F6D616C79  # "anomaly"


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
