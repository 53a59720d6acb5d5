"""Scoring of anomalies: steady series pass, bursts and slowdowns flag, thin data says nothing.

Series are built minute by minute as the rollups would hold them (outcome counts and
duration histograms); the last `window_minutes` are the window judged, the rest the
baseline.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest

from conveyor.jobs import anomalies, quantiles
from conveyor.jobs.anomalies import Floor, Limits, MinuteSample, Signal, Verdict

LIMITS = Limits()
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def minute(runs: list[float], dead: int, waits: list[float] | None = None) -> MinuteSample:
    """One rollup minute: succeeded jobs with these run times, `dead` dead jobs."""
    started = waits if waits is not None else [0.05] * (len(runs) + dead)
    return MinuteSample(
        succeeded=len(runs),
        dead=dead,
        runs=quantiles.histogram(runs),
        waits=quantiles.histogram(started),
    )


def noisy_minute(
    rng: random.Random, *, jobs: int = 30, failure: float = 0.1, run: float = 0.2
) -> MinuteSample:
    """A minute of `jobs` jobs failing with probability `failure`, run times around `run`."""
    dead = sum(rng.random() < failure for _ in range(jobs))
    runs = [rng.lognormvariate(0, 0.3) * run for _ in range(jobs - dead)]
    waits = [rng.expovariate(1 / 0.05) for _ in range(jobs)]
    return minute(runs, dead, waits)


def series(rng: random.Random, *, failure: float = 0.1, run: float = 0.2) -> list[MinuteSample]:
    """A steady baseline, then a window of minutes with this failure rate and run time."""
    baseline = [noisy_minute(rng) for _ in range(LIMITS.baseline_minutes)]
    window = [noisy_minute(rng, failure=failure, run=run) for _ in range(LIMITS.window_minutes)]
    return [*baseline, *window]


def flagged(minutes: list[MinuteSample]) -> set[Signal]:
    return {
        signal
        for signal, verdict in anomalies.score_task(minutes, LIMITS).items()
        if verdict.score >= LIMITS.open_score
    }


def test_steady_series_are_scored_and_almost_never_flagged() -> None:
    # Chance alone takes a binomial failure count 3.5 deviations up about once in a
    # thousand windows; over 300 steady series, at most that order of false alarms.
    false_alarms = 0
    for seed in range(300):
        minutes = series(random.Random(seed))
        verdicts = anomalies.score_task(minutes, LIMITS)
        assert set(verdicts) == set(Signal)
        assert verdicts[Signal.FAILURE_RATE].baseline == pytest.approx(0.1, abs=0.03)
        false_alarms += bool(flagged(minutes))
    assert false_alarms <= 3


@pytest.mark.parametrize("seed", range(10))
def test_a_burst_of_failures_is_flagged_on_failure_rate_only(seed: int) -> None:
    minutes = series(random.Random(seed), failure=0.5)
    assert flagged(minutes) == {Signal.FAILURE_RATE}
    verdict = anomalies.score_task(minutes, LIMITS)[Signal.FAILURE_RATE]
    assert verdict.value > 0.35 and verdict.score > 5


@pytest.mark.parametrize("seed", range(10))
def test_a_slowdown_is_flagged_on_run_p95(seed: int) -> None:
    assert flagged(series(random.Random(seed), run=0.6)) == {Signal.RUN_P95}


def test_only_the_bad_direction_counts() -> None:
    minutes = series(random.Random(1), failure=0.0, run=0.05)
    verdicts = anomalies.score_task(minutes, LIMITS)
    assert verdicts[Signal.FAILURE_RATE].score < 0
    assert verdicts[Signal.RUN_P95].score < -LIMITS.open_score
    assert flagged(minutes) == set()


def test_a_flat_baseline_gives_finite_scores_and_ignores_small_changes() -> None:
    same = minute([0.2] * 27, dead=3)
    flat = [same] * LIMITS.baseline_minutes
    unchanged = anomalies.score_task([*flat, *[same] * 5], LIMITS)
    assert {s: v.score for s, v in unchanged.items()} == {s: 0.0 for s in Signal}

    # One more failure a minute (10 % to 13 %) and run times 10 % longer: below the floors.
    nudged = [minute([0.22] * 26, dead=4)] * 5
    assert flagged([*flat, *nudged]) == set()

    # Half the jobs failing: far out, yet a finite score. The baseline's MAD is 0; what
    # binomial noise gives 150 jobs at 10 % is more than the floor, and divides.
    burst = [minute([0.2] * 15, dead=15)] * 5
    verdict = anomalies.score_task([*flat, *burst], LIMITS)[Signal.FAILURE_RATE]
    assert (verdict.value, verdict.baseline) == pytest.approx((0.5, 0.1))
    assert verdict.score == pytest.approx((0.5 - 0.1) / (0.1 * 0.9 / 150) ** 0.5)
    slow = [minute([0.6] * 27, dead=3)] * 5
    verdict = anomalies.score_task([*flat, *slow], LIMITS)[Signal.RUN_P95]
    # Histogram midpoints, within 5 %; the MAD is the floor: 10 ms, or 5 % of the median.
    assert verdict.value == pytest.approx(0.6, rel=0.05)
    floor = max(0.01, 0.05 * verdict.baseline)
    assert verdict.score == pytest.approx(0.6745 * (verdict.value - verdict.baseline) / floor)


def test_low_volume_is_not_scored() -> None:
    rare = [minute([0.2] * 3, dead=0)] * LIMITS.baseline_minutes
    # Every job of the window failed, but they are four in five minutes.
    window = [minute([], dead=1), minute([], dead=1), minute([], dead=1), minute([], dead=1)]
    window.append(MinuteSample())
    assert anomalies.score_task([*rare, *window], LIMITS) == {}


def test_a_short_or_thin_baseline_is_not_scored() -> None:
    busy = minute([0.2] * 27, dead=3)
    burst = [minute([0.2] * 10, dead=20)] * 5
    # Ten minutes of history: fewer baseline stretches than needed.
    short = [*[MinuteSample()] * 50, *[busy] * 10, *burst]
    assert anomalies.score_signal(Signal.FAILURE_RATE, short, LIMITS) is None
    # Enough minutes, but each stretch rests on too few jobs.
    thin = [*[minute([0.2] * 3, dead=0)] * 60, *burst]
    assert anomalies.score_signal(Signal.FAILURE_RATE, thin, LIMITS) is None
    # Enough history once the busy minutes reach back far enough.
    enough = [*[MinuteSample()] * 30, *[busy] * 30, *burst]
    assert anomalies.score_signal(Signal.FAILURE_RATE, enough, LIMITS) is not None


def test_baseline_points_are_stretches_as_long_as_the_window() -> None:
    minutes = [minute([0.2] * 9, dead=1)] * 3 + [minute([0.2] * 5, dead=5)] * 2
    points = anomalies.baseline_points(Signal.FAILURE_RATE, minutes, width=2, min_samples=20)
    assert points == pytest.approx([0.1, 0.1, 0.3, 0.5])
    assert anomalies.baseline_points(Signal.FAILURE_RATE, minutes, width=2, min_samples=21) == []


def test_robust_z_against_hand_computed_values() -> None:
    # |x - 3| = 2, 1, 0, 1, 97: the MAD is 1, and the outlier moves neither.
    assert anomalies.median_and_mad([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 1.0)
    assert anomalies.robust_z(7.0, 3.0, 1.0) == pytest.approx(0.6745 * 4)
    # Floors: absolute, or relative to the median, whichever is larger.
    assert Floor(0.01, 0.1).apply(0.0, 0.05) == 0.01
    assert Floor(0.01, 0.1).apply(0.0, 0.5) == pytest.approx(0.05)
    assert Floor(0.01, 0.1).apply(0.2, 0.5) == 0.2


def test_chance_bounds_the_mad_of_failure_rates_only() -> None:
    # 10 % over 100 jobs varies by 3 points; a task that never failed counts as 1/n.
    assert anomalies.chance_mad(Signal.FAILURE_RATE, 0.1, 100) == pytest.approx(0.6745 * 0.03)
    never = anomalies.chance_mad(Signal.FAILURE_RATE, 0.0, 100)
    assert never == pytest.approx(0.6745 * (0.01 * 0.99 / 100) ** 0.5)
    assert anomalies.chance_mad(Signal.RUN_P95, 0.3, 100) == 0.0


def test_a_few_failures_of_a_task_that_never_fails_are_within_chance() -> None:
    clean = [minute([0.2] * 30, dead=0)] * LIMITS.baseline_minutes
    two = [minute([0.2] * 30, dead=0)] * 4 + [minute([0.2] * 28, dead=2)]
    assert flagged([*clean, *two]) == set()
    many = [minute([0.2] * 25, dead=5)] * 5
    assert flagged([*clean, *many]) == {Signal.FAILURE_RATE}


def verdict(score: float) -> Verdict:
    return Verdict(signal=Signal.FAILURE_RATE, value=0.5, baseline=0.1, score=score)


@pytest.mark.parametrize(
    ("score", "last_seen_minutes_ago", "action"),
    [
        (4.0, None, "open"),
        (3.0, None, "none"),
        (None, None, "none"),
        (-9.0, None, "none"),
        (4.0, 1, "extend"),
        # Between the close and the open score, an open episode carries on.
        (2.5, 1, "extend"),
        (1.0, 1, "end"),
        (-4.0, 1, "end"),
        # Not measurable: kept a while, then ended as stale.
        (None, 1, "keep"),
        (None, LIMITS.stale_minutes, "end"),
    ],
)
def test_decide_opens_carries_on_and_ends_with_hysteresis(
    score: float | None, last_seen_minutes_ago: int | None, action: str
) -> None:
    seen = (
        None if last_seen_minutes_ago is None else NOW - dt.timedelta(minutes=last_seen_minutes_ago)
    )
    found = None if score is None else verdict(score)
    assert anomalies.decide(found, seen, now=NOW, limits=LIMITS) == action
