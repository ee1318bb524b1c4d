"""The load generator's arrival sampler: gamma gaps of mean 1 / rate, seeded, all at once for an infinite rate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megakv.bench.arrivals import arrival_offsets

NUM_SAMPLES = 40_000


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_arrival_offsets_poisson_mean_gap_and_dispersion(rate):
    offsets = arrival_offsets(NUM_SAMPLES + 1, rate, burstiness=1.0, seed=1)
    sample = gaps(offsets)
    # Exponential gaps: the mean's standard error is 1/sqrt(n) = 0.5 % of it; 3 % is six of them.
    assert sample.mean() == pytest.approx(1 / rate, rel=0.03)
    assert sample.std() / sample.mean() == pytest.approx(1.0, rel=0.03)
    # A Poisson process: counts per unit window have variance equal to their mean.
    counts = np.bincount(np.floor(np.asarray(offsets) * rate).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_arrival_offsets_burstiness_keeps_the_rate_and_sets_the_spread(burstiness):
    sample = gaps(arrival_offsets(NUM_SAMPLES + 1, 2.0, burstiness=burstiness, seed=2))
    assert sample.mean() == pytest.approx(0.5, rel=0.04)
    # Gamma with shape k: coefficient of variation 1 / sqrt(k).
    assert sample.std() / sample.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrival_offsets_start_at_zero_never_decrease_and_repeat_with_the_seed():
    offsets = arrival_offsets(200, 10.0, seed=7)
    assert offsets[0] == 0.0 and len(offsets) == 200 and all(later >= earlier
                                                              for earlier, later in zip(offsets, offsets[1:]))
    assert arrival_offsets(200, 10.0, seed=7) == offsets
    assert arrival_offsets(200, 10.0, seed=8) != offsets


def test_arrival_offsets_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf) == [0.0] * 5


@pytest.mark.parametrize("rate, burstiness, flag", [(0.0, 1.0, "--request-rate"), (-1.0, 1.0, "--request-rate"),
                                                    (math.nan, 1.0, "--request-rate"), (1.0, 0.0, "--burstiness"),
                                                    (1.0, math.inf, "--burstiness")])
def test_arrival_offsets_bad_rate_or_burstiness_names_the_flag(rate, burstiness, flag):
    with pytest.raises(ValueError, match=flag):
        arrival_offsets(3, rate, burstiness)
