"""Retry delays grow with each attempt, stay under the cap and are reproducible."""

from __future__ import annotations

import random

import pytest

from conveyor.worker.backoff import retry_delay

LARGEST_RANDOM = 1.0 - 2.0**-53  # the largest value random.random() returns


class Fixed(random.Random):
    """A generator always drawing the same value, to reach the ends of the jitter."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def bounds(attempt: int, base: float, cap: float) -> tuple[float, float]:
    """The least and greatest delay `attempt` can get."""
    ends = [retry_delay(attempt, base=base, cap=cap, rng=Fixed(v)) for v in (0.0, LARGEST_RANDOM)]
    return min(ends), max(ends)


SETTINGS = [(1.0, 300.0), (0.5, 300.0), (0.1, 60.0), (2.0, 3600.0), (3.0, 10.0)]


@pytest.mark.parametrize(("base", "cap"), SETTINGS)
def test_each_delay_is_at_least_the_longest_previous_one_below_the_cap(
    base: float, cap: float
) -> None:
    attempt = 1
    checked = 0
    # While the next attempt's exponential step is not yet cut by the cap.
    while base * 2**attempt <= cap:
        _, longest = bounds(attempt, base, cap)
        shortest_next, _ = bounds(attempt + 1, base, cap)
        assert shortest_next >= longest, attempt
        assert shortest_next > bounds(attempt, base, cap)[0]
        attempt += 1
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize(("base", "cap"), SETTINGS)
def test_sampled_delays_never_shrink_below_the_cap(base: float, cap: float) -> None:
    rng = random.Random(1234)
    previous_max = 0.0
    attempt = 1
    while base * 2 ** (attempt - 1) <= cap:
        samples = [retry_delay(attempt, base=base, cap=cap, rng=rng) for _ in range(200)]
        assert min(samples) >= previous_max, attempt
        assert len(set(samples)) > 1  # jittered: failing workers spread out
        previous_max = max(samples)
        attempt += 1


def test_first_delay_is_about_the_base() -> None:
    low, high = bounds(1, 2.0, 300.0)
    assert 0 < low <= high <= 2.0
    assert high >= 1.0


@pytest.mark.parametrize(("base", "cap"), SETTINGS)
def test_delays_respect_the_cap(base: float, cap: float) -> None:
    rng = random.Random(7)
    for attempt in range(1, 101):
        low, high = bounds(attempt, base, cap)
        assert 0 < low <= high <= cap
        assert 0 < retry_delay(attempt, base=base, cap=cap, rng=rng) <= cap
    # Far past the cap the delay stays near it rather than falling back.
    low, high = bounds(100, base, cap)
    assert low >= cap / 2
    assert high == pytest.approx(cap)


def test_deterministic_with_a_seeded_generator() -> None:
    def series(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [retry_delay(n, base=1.0, cap=300.0, rng=rng) for n in range(1, 15)]

    assert series(42) == series(42)
    assert series(42) != series(43)


def test_without_a_generator_stays_within_the_bounds() -> None:
    low, high = bounds(4, 1.0, 300.0)
    for _ in range(50):
        assert low <= retry_delay(4, base=1.0, cap=300.0) <= high
