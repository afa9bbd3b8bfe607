"""Measures of the demo and the study: area under a learning curve, samples to a level, and paired
differences over seeds with a Student-t interval of their mean and an exact sign test.

With the handful of seeds a study can afford, a percentile bootstrap of the mean under-covers: its
interval is the sample's spread times a normal quantile, shrunk by sqrt((n - 1) / n), where the
t-interval uses the Student-t quantile with n - 1 degrees of freedom, exact for normal differences.
``interval_coverage`` measures both by simulation (the test suite checks the t-interval at the
study's seed count). The sign test needs no assumption about the differences' distribution beyond
independent seeds. The Student-t quantile is computed here (the regularised incomplete beta by its
continued fraction) so that scipy is not a dependency.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np


def curve_area(samples: list[float], values: list[float], start: float) -> float:
    """Mean gain over the run: the trapezoid area of ``values - start`` over ``samples``, divided
    by the samples spanned (``samples`` increasing, at least two points)."""
    x, y = np.asarray(samples, dtype=np.float64), np.asarray(values, dtype=np.float64) - start
    if len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError(f"samples: expected at least two increasing points, got {list(samples)}")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def samples_to_level(samples: list[float], values: list[float], level: float) -> float | None:
    """The first sample count whose value is at least ``level`` (None: never reached)."""
    for x, y in zip(samples, values):
        if y >= level:
            return float(x)
    return None


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Abramowitz & Stegun 26.5.8),
    evaluated by the modified Lentz method; converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    # the number of terms grows as sqrt(max(a, b)) near the switch point
    for m in range(1, 1000 + 20 * int(math.sqrt(max(a, b)))):
        for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _regularized_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b), given both ``x`` and ``y = 1 - x`` so that neither loses digits near 1."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if y < 0.5 else math.log(x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    log_front = a * log_x + b * log_y + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def _t_upper_tail(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom and t >= 0."""
    return 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (bisection on
    its tail probability, to double precision)."""
    if not isinstance(p, Real) or isinstance(p, bool) or not 0.0 < p < 1.0:
        raise ValueError(f"p: expected a probability in (0, 1), got {p!r}")
    if not isinstance(df, Integral) or isinstance(df, bool) or df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df!r}")
    if p == 0.5:
        return 0.0
    tail = min(p, 1.0 - p)
    high = 1.0
    while _t_upper_tail(high, int(df)) > tail:
        high *= 2.0
    low = 0.0
    while high - low > 4e-16 * high:
        mid = 0.5 * (low + high)
        if _t_upper_tail(mid, int(df)) > tail:
            low = mid
        else:
            high = mid
    t = 0.5 * (low + high)
    return t if p > 0.5 else -t


def _finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def _check_level(level) -> None:
    if not isinstance(level, Real) or isinstance(level, bool) or not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (None and non-finite values dropped) and its
    Student-t interval, mean -+ t_{(1 + level) / 2, n - 1} * sd / sqrt(n). No values: all nan. One
    value: (value, -inf, +inf), since one value says nothing about the spread and the interval's
    width grows without bound as n - 1 goes to 0."""
    _check_level(level)
    x = _finite(values)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, -math.inf, math.inf
    half = t_quantile(0.5 + level / 2.0, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def sign_test(differences) -> float:
    """Two-sided exact sign test: the binomial(m, 1/2) probability of a split at least as uneven
    as the observed one, over the m non-zero differences (zeros, None and non-finite values
    dropped); 1.0 when none is left."""
    x = _finite(differences)
    positive, negative = int(np.sum(x > 0)), int(np.sum(x < 0))
    m = positive + negative
    tail = sum(math.comb(m, i) for i in range(min(positive, negative) + 1))
    return min(1.0, 2 * tail / 2 ** m)


def paired_difference(a: dict, b: dict) -> dict:
    """``a - b`` per seed (``a``, ``b``: seed -> value; the seeds both have, a pair with a None or
    non-finite value left out of the differences), with their mean, sample sd, t 95% interval,
    sign-test p-value and how many seeds have ``a > b``, ``a < b`` and ties."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds
             if a[s] is not None and b[s] is not None and math.isfinite(a[s] - b[s])]
    mean, low, high = t_interval(diffs)
    sd = float(np.std(diffs, ddof=1)) if len(diffs) >= 2 else math.nan
    return {"seeds": seeds, "differences": diffs, "mean": mean, "sd": sd, "ci95": [low, high],
            "sign_p": sign_test(diffs), "positive": sum(d > 0 for d in diffs),
            "negative": sum(d < 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "n": len(diffs)}


DISTRIBUTIONS = ("normal", "exponential", "lognormal")
METHODS = ("t", "bootstrap")


def _draw(rng: np.random.Generator, distribution: str, shape: tuple[int, int]) -> np.ndarray:
    """Samples with true mean 0: standard normal, Exp(1) - 1 (skewness 2), or
    exp(N(0, 1)) - exp(1/2) (skewness about 6.2)."""
    if distribution == "normal":
        return rng.standard_normal(shape)
    if distribution == "exponential":
        return rng.standard_exponential(shape) - 1.0
    return np.exp(rng.standard_normal(shape)) - math.exp(0.5)


def interval_coverage(n: int, trials: int, *, distribution: str = "normal", method: str = "t",
                      level: float = 0.95, seed: int = 0, resamples: int = 2000) -> float:
    """The fraction of ``trials`` simulated samples of size ``n`` (from ``distribution``, one of
    DISTRIBUTIONS, all with true mean 0) whose ``level`` interval of the mean covers the true mean.
    ``method``: "t" (``t_interval``) or "bootstrap" (the percentile bootstrap of the mean with
    ``resamples`` resamples of each sample, kept here to be compared)."""
    if not isinstance(n, Integral) or isinstance(n, bool) or n < 2:
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    if not isinstance(trials, Integral) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"trials: expected an integer >= 1, got {trials!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution: expected one of {DISTRIBUTIONS}, got {distribution!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    _check_level(level)
    if not isinstance(resamples, Integral) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"resamples: expected an integer >= 1, got {resamples!r}")
    rng = np.random.default_rng(seed)
    quantile = t_quantile(0.5 + level / 2.0, n - 1)
    tails = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    # chunks bound the memory of the bootstrap's (chunk, resamples, n) resampled values
    chunk = max(1, min(trials, 2 ** 22 // (n * (resamples if method == "bootstrap" else 1))))
    covered = 0
    for start in range(0, trials, chunk):
        x = _draw(rng, distribution, (min(chunk, trials - start), n))
        if method == "t":
            half = quantile * x.std(axis=1, ddof=1) / math.sqrt(n)
            covered += int(np.sum(np.abs(x.mean(axis=1)) <= half))
        else:
            picks = rng.integers(0, n, size=(len(x), resamples, n), dtype=np.int16)
            means = x[np.arange(len(x))[:, None, None], picks].mean(axis=2)
            low, high = np.quantile(means, tails, axis=1)
            covered += int(np.sum((low <= 0.0) & (0.0 <= high)))
    return covered / trials
