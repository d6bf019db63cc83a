"""Statistics of paired runs, on plain numbers: Student's t distribution, intervals, the paired
t-test and the number of seeds a difference needs.

Runs of two strategies with the same seed share their data (task order, validation split,
batch order) and their initial network (growth.campaign seeds both from the config's seed), so
a comparison pairs them by seed and tests the per-seed differences: the spread between seeds,
which both strategies share, drops out. `growth compare` and `growth report` call `paired`.

The t distribution is computed here, for integer degrees of freedom, from its closed form in
the angle theta = atan(t / sqrt(df)) (a finite series in cos(theta)), so the statistics need no
package beyond the standard library; tests check it against scipy and against tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95  # confidence of the intervals; a difference is significant when p < 1 - LEVEL


def _central(t: float, df: int) -> float:
    """P(-t < T < t) for Student's T with `df` degrees of freedom, t >= 0."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def _check_df(df: int) -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's T with `df` (integer) degrees of freedom."""
    _check_df(df)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    half = 0.5 * _central(abs(t), df)
    return 0.5 + half if t >= 0 else 0.5 - half


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail P(|T| >= |t|): the p-value of a t statistic."""
    _check_df(df)
    if math.isinf(t):
        return 0.0
    return max(0.0, 1.0 - _central(abs(t), df))


def t_quantile(q: float, df: int) -> float:
    """The t with P(T <= t) = q (bisection on the distribution function)."""
    _check_df(df)
    if not 0.0 < q < 1.0:
        raise ValueError(f"a quantile's probability must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    target = 2 * q - 1  # P(-t < T < t)
    lo, hi = 0.0, 1.0
    while _central(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _central(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t interval at `level`."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of `values` with its t interval (needs two values or more)."""
    mean, sd = mean_sd(values)
    n = len(values)
    if n < 2:
        raise ValueError("an interval needs at least two values")
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, level)


@dataclass(frozen=True)
class Paired:
    """The paired comparison of a with b: the mean of the differences a - b, its interval, the
    t statistic and the two-sided p-value of the paired t-test (H0: mean difference 0)."""

    n: int
    diff: float
    sd: float
    low: float
    high: float
    t: float
    p: float
    level: float = LEVEL

    @property
    def significant(self) -> bool:
        return self.p < 1 - self.level


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Paired:
    """Paired t-test of a against b (a[i] and b[i] share seed i); needs two pairs or more."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    ci = mean_interval(d, level)
    if ci.sd == 0.0:  # every pair differs by the same amount
        t = 0.0 if ci.mean == 0.0 else math.copysign(math.inf, ci.mean)
        p = 1.0 if ci.mean == 0.0 else 0.0
    else:
        t = ci.mean / (ci.sd / math.sqrt(ci.n))
        p = t_sf2(t, ci.n - 1)
    return Paired(ci.n, ci.mean, ci.sd, ci.low, ci.high, t, p, level)


def seeds_needed(sd: float, delta: float, level: float = LEVEL, power: float = 0.8,
                 most: int = 10_000) -> int:
    """The fewest pairs with which a paired t-test at `level` detects a true mean difference
    `delta` with probability `power`, when the differences spread with standard deviation
    `sd`: the smallest n >= 2 with (t[level] + t[power]) * sd / sqrt(n) <= delta (the usual
    approximation of the noncentral t)."""
    if delta <= 0 or sd < 0:
        raise ValueError("delta must be positive and sd non-negative")
    for n in range(2, most + 1):
        q = t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1)
        if q * sd / math.sqrt(n) <= delta:
            return n
    return most
