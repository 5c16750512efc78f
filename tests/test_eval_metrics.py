"""Eval statistics against table values and hand computations."""
from __future__ import annotations

import math

import pytest

from rlhfkit.eval import judges, metrics


@pytest.mark.parametrize("df, want", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228),
                                      (30, 2.042), (1000, 1.962)])
def test_t_quantile_matches_tables(df, want):
    assert metrics.t_quantile(0.975, df) == pytest.approx(want, abs=2e-3)


def test_mean_ci_by_hand():
    m, lo, hi = metrics.mean_ci([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd 1.291, se 0.6455, t(0.975, 3) = 3.182 -> half width 2.054
    assert m == 2.5 and hi - m == pytest.approx(2.054, abs=2e-3) and m - lo == pytest.approx(hi - m)


def test_wilson_by_hand():
    p, lo, hi = metrics.wilson_ci(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert metrics.wilson_ci(0, 20)[1] == 0.0 and metrics.wilson_ci(0, 20)[2] > 0.1


def test_paired_bootstrap_and_overlap():
    a = [0.0] * 50
    b = [1.0 + 0.1 * (i % 3) for i in range(50)]
    d, lo, hi = metrics.paired_bootstrap_diff(a, b)
    assert d == pytest.approx(sum(b) / 50) and lo > 0.9 and hi < 1.2
    assert not metrics.intervals_overlap(metrics.mean_ci(a), metrics.mean_ci(b))
    assert metrics.intervals_overlap((0, -1, 1), (0.5, 0.2, 2))


def test_distinct_n_and_win_rate():
    assert metrics.distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert metrics.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b), (b a) of 4 bigrams
    assert metrics.distinct_n([""], 2) == 0.0
    assert metrics.win_rate([0, 0, 1, 1], [1, 0, 0, 2])[0] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert math.isnan(metrics.pearson([1], [2]))


def test_vader_judge():
    assert judges.vader_positive(["A wonderful, moving film.", "Dull and awful.", "It is a film."]) == \
        [True, False, False]
    assert judges.vader_compound(["great"])[0] > 0.5
