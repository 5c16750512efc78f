"""Agreement metrics against published worked examples and an independent brute-force computation."""
from __future__ import annotations

import itertools
import random

import pytest

from rlhfkit.feedback.agreement import (
    category_counts,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    units_from_matrix,
    vader_alpha,
)

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 coders x 12 units with
# missing values. Published: nominal .743, ordinal .815, interval .849, ratio .797.
K2011 = [[1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
         [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
         [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
         [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]]


@pytest.mark.parametrize("level,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849),
                                             ("ratio", 0.797)])
def test_alpha_matches_krippendorff_2011(level, published):
    assert krippendorff_alpha(units_from_matrix(K2011), level) == pytest.approx(published, abs=5e-4)


def test_alpha_small_cases_by_hand():
    # Two units, two raters: (1, 1) and (2, 3). Pairable values n = 4: {1, 1, 2, 3}.
    # Interval: D_o = (0 + 0 + 1 + 1) / 4 = 0.5 (each unit's ordered pairs, divided by m_u - 1 = 1).
    # D_e = sum over ordered pairs of distinct values (v_i - v_j)^2 / (n (n - 1)):
    #   pairs among {1,1,2,3}: (1,2)x2, (1,3)x2, (2,3)x1 each both ways -> 2*(2*1 + 2*4 + 1*1) = 22; / 12
    assert krippendorff_alpha([[1, 1], [2, 3]], "interval") == pytest.approx(1 - 0.5 / (22 / 12))
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "interval") == pytest.approx(1.0)
    assert krippendorff_alpha([[1], [2]], "interval") != krippendorff_alpha([[1], [2]], "interval")  # NaN
    assert krippendorff_alpha([[2, 2], [2, 2]]) != krippendorff_alpha([[2, 2], [2, 2]])  # no variation: NaN


def _alpha_interval_brute(units):
    """Straight from the definition: within-unit vs all pairable-value squared differences."""
    units = [u for u in units if len(u) >= 2]
    vals = [v for u in units for v in u]
    n = len(vals)
    d_o = sum(sum((a - b) ** 2 for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in units) / n
    d_e = sum((a - b) ** 2 for a, b in itertools.permutations(vals, 2)) / (n * (n - 1))
    return 1 - d_o / d_e


def test_alpha_interval_equals_brute_force_on_random_units():
    rng = random.Random(0)
    for _ in range(5):
        units = [[rng.randint(-4, 4) for _ in range(rng.randint(1, 6))] for _ in range(30)]
        assert krippendorff_alpha(units, "interval") == pytest.approx(_alpha_interval_brute(units), rel=1e-12)


def test_fleiss_kappa_wikipedia_example():
    # 10 subjects, 14 raters, 5 categories (Fleiss 1971 style example): kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)
    assert category_counts([["a", "a", "b"], ["b", "b", "b"]]) == [[2, 1], [0, 3]]
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 0]])


def test_cohen_kappa_by_hand():
    # yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5 -> 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # Weighted, 3 ordered labels; one off-by-one disagreement and one off-by-two:
    # a = 1,2,3,1  b = 1,3,3,3. Linear weights |i-j|: observed = (1 + 2) / 4 = 0.75;
    # marginals a: 1:.5 2:.25 3:.25, b: 1:.25 3:.75 -> expected = sum p_a(i) p_b(j) |i-j|
    #   = .5*.25*0 + .5*.75*2 + .25*.25*1 + .25*.75*1 + .25*.25*2 + .25*.75*0 = 1.125
    assert cohen_kappa([1, 2, 3, 1], [1, 3, 3, 3], "linear") == pytest.approx(1 - 0.75 / 1.125)


def test_alpha_of_real_vader_ratings_is_in_a_sane_range():
    rows = {r["data"]: r for r in vader_alpha(["tweets"])}
    tw = rows["snippets/tweets"]
    assert tw["units"] == 4200 and tw["ratings"] > 4200 * 20
    # Recorded in docs/benchmarks.md: interval 0.783, ordinal 0.788; the lexicon ~0.73.
    assert 0.7 < tw["alpha_interval"] < 0.85 and 0.7 < tw["alpha_ordinal"] < 0.85
    assert 0.65 < rows["lexicon words"]["alpha_interval"] < 0.8
