"""Percentiles of durations: exact (nearest rank) and from mergeable log-bucket histograms.

Rollups keep, per minute, exact percentiles and a histogram; a window of many minutes
is answered by adding histograms, which is exact in counts and within one bucket
(10 %) in values. Both paths use the same nearest-rank rule, so a histogram answer
lands in the bucket that holds the exact answer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PERCENTILES = (50, 95, 99)

# Bucket i holds [FLOOR * GROWTH**i, FLOOR * GROWTH**(i + 1)); bucket 0 also holds
# everything below FLOOR, the last bucket everything above (about 80 years).
BUCKET_FLOOR = 0.001
BUCKET_GROWTH = 1.1
MAX_BUCKET = 300
_LOG_GROWTH = math.log(BUCKET_GROWTH)


@dataclass(frozen=True, slots=True)
class Quantiles:
    """p50, p95 and p99 in seconds; None without samples."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    def as_tuple(self) -> tuple[float | None, float | None, float | None]:
        """(p50, p95, p99)."""
        return (self.p50, self.p95, self.p99)


def rank_of(percentile: int, count: int) -> int:
    """The 1-based nearest rank of `percentile` among `count` samples: ceil(p·n/100).

    Integer arithmetic, so p·n/100 landing exactly on a whole number never rounds up.
    """
    return max(1, -(-percentile * count // 100))


def exact(values: Iterable[float]) -> Quantiles:
    """Nearest-rank p50/p95/p99 of `values` (what PostgreSQL's percentile_disc gives)."""
    ordered = sorted(values)
    if not ordered:
        return Quantiles()
    p50, p95, p99 = (ordered[rank_of(p, len(ordered)) - 1] for p in PERCENTILES)
    return Quantiles(p50, p95, p99)


def bucket_of(seconds: float) -> int:
    """The histogram bucket holding a duration."""
    if not seconds > BUCKET_FLOOR:  # also catches NaN
        return 0
    return min(MAX_BUCKET, math.floor(math.log(seconds / BUCKET_FLOOR) / _LOG_GROWTH))


def bucket_value(index: int) -> float:
    """The value reported for a bucket: its midpoint, within 5 % of anything in it."""
    lower = BUCKET_FLOOR * BUCKET_GROWTH**index
    return lower * (1 + BUCKET_GROWTH) / 2


def histogram(values: Iterable[float]) -> Counter[int]:
    """Counts per bucket of `values`."""
    return Counter(bucket_of(v) for v in values)


def from_histogram(counts: Mapping[int, int]) -> Quantiles:
    """Nearest-rank p50/p95/p99 read off a histogram, as bucket midpoints."""
    total = sum(counts.values())
    if total <= 0:
        return Quantiles()
    ordered = sorted((i, n) for i, n in counts.items() if n > 0)
    found: list[float] = []
    for percentile in PERCENTILES:
        rank = rank_of(percentile, total)
        seen = 0
        for index, n in ordered:
            seen += n
            if seen >= rank:
                found.append(bucket_value(index))
                break
    return Quantiles(*found)


def histogram_to_json(counts: Mapping[int, int]) -> dict[str, int]:
    """A histogram as a JSON object (keys are strings in JSON)."""
    return {str(i): int(n) for i, n in sorted(counts.items()) if n > 0}


def histogram_from_json(data: Mapping[str, int] | None) -> Counter[int]:
    """A histogram read back from its JSON object."""
    return Counter({int(i): int(n) for i, n in (data or {}).items()})


def rounded(quantiles: Quantiles, digits: int = 6) -> Quantiles:
    """The same percentiles rounded for display."""
    return Quantiles(*(None if v is None else round(v, digits) for v in quantiles.as_tuple()))


def merge(histograms: Sequence[Mapping[int, int]]) -> Counter[int]:
    """The sum of several histograms."""
    total: Counter[int] = Counter()
    for h in histograms:
        total.update(h)
    return total
