"""Evaluation statistics: pure functions on numbers and strings (no models here).

Every mean comes with a 95% interval so "the policy improved" is a claim with error bars: a t-interval
for means of per-prompt scores, a Wilson interval for rates, a paired bootstrap for differences.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom: the t CDF (Simpson integration of the density)
    inverted by bisection; exact to ~1e-6, no scipy needed."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    v = float(df)
    log_norm = math.lgamma((v + 1) / 2) - math.lgamma(v / 2) - 0.5 * math.log(v * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 2001)  # even number of intervals for Simpson's rule
        f = np.exp(log_norm - (v + 1) / 2 * np.log1p(grid ** 2 / v))
        h = x / 2000
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean."""
    a = np.asarray(xs, dtype=np.float64)
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if n == 1:
        return m, m, m
    half = t_quantile(0.5 + level / 2, n - 1) * float(a.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(rate, low, high): Wilson score interval of a binomial proportion (sane at 0% and 100%)."""
    if n == 0:
        return math.nan, math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; floating point would leave ~1e-17.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return p, lo, hi


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b - a), low, high) over paired items (same prompts before/after), bootstrap percentile CI."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> tuple[float, float, float]:
    """Share of items where b beats a (ties count half), with a Wilson interval on the decisive count."""
    wins = sum(1.0 if y > x else 0.5 if y == x else 0.0 for x, y in zip(scores_a, scores_b))
    n = len(scores_a)
    _, lo, hi = wilson_ci(round(wins), n)
    return (wins / n if n else math.nan), lo, hi


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens of all texts (Li et al. 2016)."""
    grams: Counter = Counter()
    for t in texts:
        w = t.split()
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def length_stats(token_lengths: Sequence[int]) -> dict[str, float]:
    a = np.asarray(token_lengths, dtype=np.float64)
    if len(a) == 0:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan}
    return {"mean": float(a.mean()), "p50": float(np.median(a)), "p90": float(np.quantile(a, 0.9))}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def intervals_overlap(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two (estimate, low, high) intervals overlap."""
    return not (a[2] < b[1] or b[2] < a[1])
