"""growth.stats against hand computations, printed tables and scipy (an independent
implementation of the t distribution)."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from growth.stats import mean_interval, mean_sd, paired, seeds_needed, t_cdf, t_quantile, t_sf2

# five seeds of two strategies; differences 0.02, 0.01, 0.03, 0.01, 0.03
A = [0.90, 0.92, 0.95, 0.91, 0.93]
B = [0.88, 0.91, 0.92, 0.90, 0.90]


def test_t_distribution_by_hand() -> None:
    # df 1 is Cauchy: P(T <= 1) = 1/2 + atan(1)/pi = 3/4
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-15)
    # df 2: P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2))
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(6)), abs=1e-15)
    # df 3: 1/2 + (u / (1 + u^2) + atan(u)) / pi, u = t / sqrt(3)
    u = 1.5 / math.sqrt(3)
    assert t_cdf(1.5, 3) == pytest.approx(0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi,
                                          abs=1e-15)
    assert t_cdf(-1.5, 3) == pytest.approx(1 - t_cdf(1.5, 3), abs=1e-15)
    assert t_cdf(0.0, 7) == 0.5 and t_sf2(0.0, 7) == pytest.approx(1.0)
    assert t_cdf(math.inf, 4) == 1.0 and t_sf2(-math.inf, 4) == 0.0


@pytest.mark.parametrize("q, df, table", [(0.975, 1, 12.706), (0.975, 4, 2.776),
                                          (0.975, 9, 2.262), (0.975, 30, 2.042),
                                          (0.8, 9, 0.883), (0.995, 5, 4.032)])
def test_quantiles_match_printed_tables(q: float, df: int, table: float) -> None:
    assert t_quantile(q, df) == pytest.approx(table, abs=5e-4)
    assert t_quantile(1 - q, df) == pytest.approx(-table, abs=5e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9, 19, 50, 301])
def test_the_t_distribution_matches_scipy(df: int) -> None:
    for t in (0.05, 0.7, 1.0, 2.2, 4.5, 11.0):
        assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-11)
        assert t_sf2(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), abs=1e-11)
    for q in (0.6, 0.8, 0.9, 0.975, 0.999):
        assert t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9)


def test_paired_test_by_hand() -> None:
    """Differences 0.02, 0.01, 0.03, 0.01, 0.03: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 5)
    = sqrt(20); with 4 degrees of freedom P(|T| < t) = sin(th)(1 + cos^2(th) / 2), tan(th) =
    t / 2 = sqrt 5, so cos^2 = 1/6 and p = 1 - sqrt(5/6) * 13/12."""
    d = paired(A, B)
    assert d.n == 5
    assert d.diff == pytest.approx(0.02, abs=1e-15)
    assert d.sd == pytest.approx(0.01, abs=1e-15)
    assert d.t == pytest.approx(math.sqrt(20), rel=1e-12)
    assert d.p == pytest.approx(1 - math.sqrt(5 / 6) * 13 / 12, abs=1e-12)
    half = 2.7764451051977987 * 0.01 / math.sqrt(5)  # t(0.975, 4), from tables to 16 digits
    assert (d.low, d.high) == (pytest.approx(0.02 - half, abs=1e-12),
                               pytest.approx(0.02 + half, abs=1e-12))
    assert d.significant
    ref = scipy_stats.ttest_rel(A, B)
    assert (d.t, d.p) == (pytest.approx(ref.statistic, rel=1e-12),
                          pytest.approx(ref.pvalue, rel=1e-9))
    # the direction is that of a - b
    back = paired(B, A)
    assert back.diff == pytest.approx(-0.02) and back.t == pytest.approx(-d.t)
    assert back.p == pytest.approx(d.p)


def test_a_difference_inside_the_noise_is_not_significant() -> None:
    a = [0.90, 0.93, 0.91, 0.95, 0.92]
    b = [0.91, 0.92, 0.93, 0.93, 0.93]  # differences -0.01, 0.01, -0.02, 0.02, -0.01
    d = paired(a, b)
    assert d.low < 0 < d.high and d.p > 0.05 and not d.significant
    assert d.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)


def test_equal_differences_and_errors() -> None:
    same = paired([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same.diff, same.p, same.low, same.high) == (0.0, 1.0, 0.0, 0.0)
    shift = paired([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert shift.p == 0.0 and shift.significant and shift.low == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equal lengths"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="two values"):
        paired([1.0], [2.0])
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)


def test_mean_interval_by_hand() -> None:
    ci = mean_interval([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sd sqrt(5/3), t(0.975, 3) = 3.182446
    assert ci.mean == 2.5 and ci.sd == pytest.approx(math.sqrt(5 / 3))
    assert ci.half_width == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-12)
    assert mean_sd([3.0]) == (3.0, 0.0)


def test_seeds_needed_by_hand() -> None:
    """sd = delta: n = 10, since (t(.975, 9) + t(.8, 9)) / sqrt(10) = (2.2622 + 0.8834) / 3.1623
    = 0.995 <= 1, while n = 9 gives (2.3060 + 0.8889) / 3 = 1.065 > 1."""
    assert seeds_needed(0.01, 0.01) == 10
    assert seeds_needed(0.005, 0.01) < 10 < seeds_needed(0.02, 0.01)
    # twice the spread needs about four times the pairs
    assert 3.5 < seeds_needed(0.04, 0.01) / seeds_needed(0.02, 0.01) < 4.5
    with pytest.raises(ValueError):
        seeds_needed(0.01, 0.0)
