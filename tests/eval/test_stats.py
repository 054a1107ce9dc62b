"""Wilson intervals against hand-computed values and scipy's binomtest (method='wilson')."""

import math

import pytest

from kto_jax.eval import stats


def test_wilson_matches_hand_computation():
    # n = 40, 30 successes, 90%: z = 1.6448536, p = 0.75
    z = 1.6448536269514722
    p, n = 0.75, 40
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = stats.wilson_interval(30, 40, 0.90)
    assert low == pytest.approx(center - half, abs=1e-12)
    assert high == pytest.approx(center + half, abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.624, 0.8443)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 64), (1, 1)])
def test_wilson_matches_scipy(k, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    low, high = stats.wilson_interval(k, n, 0.9)
    assert low == pytest.approx(ci.low, abs=1e-9)
    assert high == pytest.approx(ci.high, abs=1e-9)


def test_winrate_counts_ties_as_half():
    r = stats.winrate([1, 1, 0.5, 0, 0.5])
    assert r.rate == pytest.approx(3 / 5) and r.n == 5
    assert r.low < r.rate < r.high
    assert stats.rate(0, 0).as_dict()["high"] == 1.0
    with pytest.raises(ValueError):
        stats.winrate([2])
    assert str(stats.rate(3, 4)).startswith("75.0% [")
