"""Measures of the demo and the study: area under a learning curve, samples to a level, and
paired differences over seeds with a percentile-bootstrap interval and a sign count."""

from __future__ import annotations

import math

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


def bootstrap_mean_interval(values, resamples: int = 10000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap interval, resampling
    the values with replacement ``resamples`` times with a fixed seed."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(x.mean()), float(low), float(high)


def paired_difference(a: dict, b: dict, resamples: int = 10000, seed: int = 0) -> dict:
    """``a - b`` per seed (``a``, ``b``: seed -> value, the seeds both have), with the mean, its
    bootstrap 95% interval and how many seeds have ``a > b``, ``a < b`` and ties."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    mean, low, high = bootstrap_mean_interval(diffs, resamples, seed)
    return {"seeds": seeds, "differences": diffs, "mean": mean, "ci95": [low, high],
            "positive": sum(d > 0 for d in diffs), "negative": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs), "n": len(diffs)}
