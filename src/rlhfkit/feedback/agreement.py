"""Inter-annotator agreement: Krippendorff's alpha (nominal, ordinal, interval, ratio), Cohen's and
Fleiss' kappa. Pure functions of plain Python data; tested against published worked examples.

Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"):
    alpha = 1 - D_o / D_e
with D_o the observed and D_e the expected disagreement, both from the coincidence matrix
    o_ck = sum_u (number of c-k value pairs in unit u) / (m_u - 1)
over units u with m_u >= 2 values. It allows any number of raters per unit and missing values, and the
raters need not be the same people across units (exactly the VADER data).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import Literal

import numpy as np

Level = Literal["nominal", "ordinal", "interval", "ratio"]


def coincidences(units: Iterable[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values (V,) and the coincidence matrix o (V, V) of the pairable units."""
    units = [list(u) for u in units if len(u) >= 2]
    values = np.array(sorted({v for u in units for v in u}), dtype=float)
    if not units:
        return values, np.zeros((0, 0))
    index = {v: i for i, v in enumerate(values.tolist())}
    counts = np.zeros((len(units), len(values)))                   # (U, V) how often unit u has value v
    for r, u in enumerate(units):
        for v in u:
            counts[r, index[float(v)]] += 1
    m = counts.sum(1, keepdims=True)                                # (U, 1) values per unit
    weighted = counts / (m - 1)
    # sum_u (c_u c_u^T - diag(c_u)) / (m_u - 1): pairs of values from different raters of one unit
    o = weighted.T @ counts - np.diag(weighted.sum(0))
    return values, o


def _delta2(values: np.ndarray, n_c: np.ndarray, level: Level) -> np.ndarray:
    """Squared difference delta^2(c, k) between values for the metric of `level` (V, V)."""
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    if level == "interval":
        return (values[:, None] - values[None, :]) ** 2
    if level == "ratio":
        s = values[:, None] + values[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(s != 0, (values[:, None] - values[None, :]) / s, 0.0)
        return d ** 2
    if level == "ordinal":
        # delta(c, k) = sum of n_g for g from c to k, minus half of n_c and n_k: distance in ranks.
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        i = np.arange(len(values))
        lo, hi = np.minimum.outer(i, i), np.maximum.outer(i, i)
        d = cum[hi + 1] - cum[lo] - (n_c[lo] + n_c[hi]) / 2
        return d ** 2
    raise ValueError(f"unknown level {level!r}; choose nominal, ordinal, interval or ratio")


def krippendorff_alpha(units: Iterable[Sequence[float]], level: Level = "interval") -> float:
    """Krippendorff's alpha of a list of units, each the list of values raters gave it (missing values
    simply absent). Units with fewer than 2 values carry no information and are ignored. NaN when there is
    no variation at all (alpha is undefined then)."""
    values, o = coincidences(units)
    if o.size == 0:
        return float("nan")
    n_c = o.sum(1)                                                  # (V,) pairable values per value
    n = n_c.sum()
    d2 = _delta2(values, n_c, level)
    d_o = (o * d2).sum() / n
    d_e = (np.outer(n_c, n_c) * d2).sum() / (n * (n - 1))
    return float("nan") if d_e == 0 else float(1.0 - d_o / d_e)


def units_from_matrix(matrix: Sequence[Sequence[float | None]]) -> list[list[float]]:
    """Reliability data as raters x units (None = missing) -> one value list per unit."""
    n_units = max((len(r) for r in matrix), default=0)
    return [[r[u] for r in matrix if u < len(r) and r[u] is not None and not
             (isinstance(r[u], float) and math.isnan(r[u]))] for u in range(n_units)]


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable],
                weights: Literal["linear", "quadratic"] | None = None) -> float:
    """Cohen's kappa of two raters over the same items. Weighted variants need numeric (ordered) labels."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty label lists (got {len(a)} and {len(b)})")
    labels = sorted(set(a) | set(b))
    idx = {c: i for i, c in enumerate(labels)}
    k = len(labels)
    table = np.zeros((k, k))
    for x, y in zip(a, b):
        table[idx[x], idx[y]] += 1
    table /= table.sum()
    expected = np.outer(table.sum(1), table.sum(0))
    if weights is None:
        w = 1.0 - np.eye(k)
    else:
        vals = np.array(labels, dtype=float)
        diff = np.abs(vals[:, None] - vals[None, :])
        w = diff if weights == "linear" else diff ** 2
    den = (w * expected).sum()
    return float("nan") if den == 0 else float(1.0 - (w * table).sum() / den)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a subjects x categories matrix of how many raters put each subject in each
    category. Every subject needs >= 2 ratings; with unequal numbers per subject this is the usual
    generalisation (per-subject agreement P_i uses its own n_i; category shares are pooled)."""
    c = np.asarray(counts, dtype=float)                             # (N, K)
    n_i = c.sum(1)
    if c.ndim != 2 or len(c) == 0 or (n_i < 2).any():
        raise ValueError("need a subjects x categories count matrix with >= 2 ratings per subject")
    p_i = ((c * c).sum(1) - n_i) / (n_i * (n_i - 1))                # agreement within each subject
    p_j = c.sum(0) / n_i.sum()                                      # share of each category
    p_bar, p_e = p_i.mean(), (p_j ** 2).sum()
    return float("nan") if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


def category_counts(units: Iterable[Sequence[Hashable]]) -> list[list[int]]:
    """Per-unit label lists -> the subjects x categories count matrix fleiss_kappa takes."""
    units = [list(u) for u in units]
    cats = sorted({v for u in units for v in u}, key=str)
    return [[Counter(u)[c] for c in cats] for u in units]


def vader_alpha(domains: list[str] | None = None) -> list[dict]:
    """Krippendorff's alpha of the real per-rater VADER ratings, per domain (units = snippets) and for
    the lexicon (units = words, 10 raters each)."""
    from rlhfkit.data.sources import VADER_DOMAINS, vader_items, vader_lexicon

    out = []
    for d in domains or list(VADER_DOMAINS):
        units = [it.ratings for it in vader_items([d])]
        out.append(_alpha_row(f"snippets/{d}", units))
    out.append(_alpha_row("lexicon words", [r for _, r in vader_lexicon().values()]))
    return out


def _alpha_row(name: str, units: list[list[int]]) -> dict:
    return {"data": name, "units": len(units), "ratings": sum(len(u) for u in units),
            "alpha_interval": krippendorff_alpha(units, "interval"),
            "alpha_ordinal": krippendorff_alpha(units, "ordinal")}


def store_agreement(store, project: str, round: int | None = None) -> dict:
    """Agreement among annotators of a project (or round), from the live answers in the store:
    ratings alpha (interval, ordinal; units = rated samples), pair choices (nominal alpha, and Fleiss'
    kappa when every pair task has the same number of answers), rankings (ordinal alpha of each
    completion's position; units = (task, completion)). None where fewer than 2 answers overlap."""
    from collections import defaultdict

    from rlhfkit.feedback.export import raw_records

    raw = raw_records(store, project, round)
    out: dict = {}
    rated: dict = defaultdict(list)
    for r in raw["ratings"]:
        rated[r["item_id"]].append(r["rating"])
    units = [u for u in rated.values() if len(u) >= 2]
    out["ratings_units"] = len(units)
    out["ratings_alpha_interval"] = _or_none(krippendorff_alpha(units, "interval")) if units else None
    out["ratings_alpha_ordinal"] = _or_none(krippendorff_alpha(units, "ordinal")) if units else None
    picked: dict = defaultdict(list)
    for r in raw["pairs"]:
        if r["source"] == "pair":
            picked[r["task"]].append("tie" if r["tie"] else r["chosen"])
    units = [u for u in picked.values() if len(u) >= 2]
    out["pairs_units"] = len(units)
    labels = {v: i for i, v in enumerate(sorted({v for u in units for v in u}))}
    out["pairs_alpha_nominal"] = _or_none(krippendorff_alpha([[labels[v] for v in u] for u in units],
                                                             "nominal")) if units else None
    sizes = {len(u) for u in units}
    out["pairs_fleiss_kappa"] = _or_none(fleiss_kappa(category_counts(units))) if len(sizes) == 1 else None
    positions: dict = defaultdict(list)
    for r in raw["rankings"]:
        for pos, text in enumerate(r["completions"]):
            positions[(r["task"], text)].append(pos)
    units = [u for u in positions.values() if len(u) >= 2]
    out["rankings_units"] = len(units)
    out["rankings_alpha_ordinal"] = _or_none(krippendorff_alpha(units, "ordinal")) if units else None
    return out


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)
