"""Nearest-rank percentiles, exact and from merged log-bucket histograms."""

from __future__ import annotations

import random

import pytest

from conveyor.jobs import quantiles
from conveyor.jobs.quantiles import Quantiles


def test_nearest_rank_is_ceil_of_p_times_n() -> None:
    assert quantiles.exact([]) == Quantiles()
    assert quantiles.exact([3.0]) == Quantiles(3.0, 3.0, 3.0)
    values = [float(v) for v in range(1, 101)]
    random.Random(1).shuffle(values)
    # ceil(0.5·100) = 50, ceil(0.95·100) = 95, ceil(0.99·100) = 99: whole numbers stay put.
    assert quantiles.exact(values) == Quantiles(50.0, 95.0, 99.0)
    assert quantiles.exact([float(v) for v in range(1, 21)]) == Quantiles(10.0, 19.0, 20.0)
    assert [quantiles.rank_of(95, n) for n in (1, 19, 20, 21)] == [1, 19, 19, 20]


def test_buckets_cover_every_duration_in_order() -> None:
    assert quantiles.bucket_of(0.0) == quantiles.bucket_of(-1.0) == 0
    assert quantiles.bucket_of(float("nan")) == 0
    assert quantiles.bucket_of(1e30) == quantiles.MAX_BUCKET
    samples = sorted(10 ** random.Random(2).uniform(-4, 6) for _ in range(2000))
    indexes = [quantiles.bucket_of(v) for v in samples]
    assert indexes == sorted(indexes)
    for value, index in zip(samples, indexes, strict=True):
        assert abs(quantiles.bucket_value(index) - value) <= 0.05 * value + 0.0011


def test_merged_histograms_answer_within_a_bucket() -> None:
    rng = random.Random(3)
    parts = [[rng.lognormvariate(0, 2) for _ in range(rng.randrange(1, 300))] for _ in range(40)]
    merged = quantiles.merge([quantiles.histogram(p) for p in parts])
    everything = [v for p in parts for v in p]
    assert sum(merged.values()) == len(everything)
    approx = quantiles.from_histogram(merged).as_tuple()
    exact = quantiles.exact(everything).as_tuple()
    for a, e in zip(approx, exact, strict=True):
        assert a is not None and e is not None
        assert a == pytest.approx(e, rel=0.1, abs=0.0011)
    as_json = quantiles.histogram_to_json(merged)
    assert all(isinstance(k, str) for k in as_json)
    assert quantiles.histogram_from_json(as_json) == merged
    assert quantiles.from_histogram({}) == Quantiles()
