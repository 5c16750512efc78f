"""How well a reward model agrees with people: correlation, pairwise accuracy, calibration, baselines.

Pure numpy on scores and human ratings:
  pearson / spearman        model score vs the human mean rating of each text
  pair_metrics              accuracy of score differences over pairs, said three ways: strict (a tie is
                            wrong), ties (count and share) and ties-as-half; with a 95% Wilson interval
  pairwise_accuracy         pair_metrics over all pairs of texts (of one domain) whose human means differ
                            by >= min_diff
  rater_preference          P(a random rater of text a rates it above a random rater of text b), ties 1/2:
                            the empirical preference a Bradley-Terry probability should match
  preference_scale / ece    temperature of sigmoid(s * (r_a - r_b)) fitted to rater preferences, and the
                            expected calibration error of the resulting probabilities (ece_raw: s = 1,
                            the calibration of a Bradley-Terry model's own logits)
  one_rater_r               leave-one-rater-out: one person's rating vs the mean of the others (the ceiling)
  vader_scores              the VADER lexicon's compound score (Hutto & Gilbert 2014), the classic baseline
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]  # start of each run of equal values
    run = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = avg[run]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a proportion k / n; (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(mid - half), float(mid + half)


def pair_metrics(diffs: np.ndarray) -> dict:
    """Accuracy of score differences (preferred minus other), (P,) -> counts and shares. A tie (equal
    scores, e.g. two texts identical after truncation) is not a win: `pair_acc` is strict, `ties` and
    `tie_share` say how many, `pair_acc_ties_half` counts each as half a win (what a coin flip would get).
    The interval is Wilson's for the strict accuracy, treating pairs as independent (pairs expanded from
    one ranking are not, so it is then too narrow)."""
    d = np.asarray(diffs, float)
    n, wins, ties = len(d), int((d > 0).sum()), int((d == 0).sum())
    lo, hi = wilson_interval(wins, n)
    nan = float("nan")
    return {"pair_acc": wins / n if n else nan, "pair_acc_lo": lo, "pair_acc_hi": hi, "ties": ties,
            "tie_share": ties / n if n else nan, "pair_acc_ties_half": (wins + 0.5 * ties) / n if n else nan,
            "n_pairs": n}


def pairwise_accuracy(scores: np.ndarray, means: np.ndarray, min_diff: float = 1.0,
                      groups: Sequence[str] | None = None) -> dict:
    """pair_metrics over the pairs (within a group) with |mean_a - mean_b| >= min_diff, the differences
    taken higher-rated minus lower-rated."""
    scores, means = np.asarray(scores, float), np.asarray(means, float)
    groups = np.asarray(groups if groups is not None else [""] * len(scores))
    diffs = []
    for g in np.unique(groups):
        s, m = scores[groups == g], means[groups == g]
        dm = m[:, None] - m[None, :]  # (n, n); each unordered pair appears once with dm > 0
        ds = s[:, None] - s[None, :]
        diffs.append(ds[dm >= min_diff])
    return pair_metrics(np.concatenate(diffs) if diffs else np.zeros(0))


def rater_preference(a: Sequence[float], b: Sequence[float]) -> float:
    """P(rating of a > rating of b) + P(equal) / 2 for a random rating of each: (n,), (m,) -> float."""
    d = np.subtract.outer(np.asarray(a, float), np.asarray(b, float))
    return float((d > 0).mean() + 0.5 * (d == 0).mean())


def sample_pairs(groups: Sequence[str], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random (a, b) index pairs with a != b from the same group."""
    groups = np.asarray(groups)
    a_all, b_all = [], []
    uniq, counts = np.unique(groups, return_counts=True)
    for g, c in zip(uniq, counts):
        if c < 2:
            continue
        idx = np.flatnonzero(groups == g)
        k = round(n * int(c) / len(groups))
        a, b = rng.integers(0, c, k), rng.integers(0, c - 1, k)
        b = b + (b >= a)  # never the same item
        a_all.append(idx[a])
        b_all.append(idx[b])
    if not a_all:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(a_all), np.concatenate(b_all)


def preference_scale(diffs: np.ndarray, target: np.ndarray, iters: int = 50) -> float:
    """The s >= 0 minimising cross-entropy(target, sigmoid(s * diffs)) (Newton on one parameter)."""
    d, t = np.asarray(diffs, float), np.asarray(target, float)
    s = 1.0 / max(np.std(d), 1e-6)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(s * d, -50, 50)))
        grad = ((p - t) * d).mean()
        hess = (p * (1 - p) * d * d).mean() + 1e-12
        s_new = max(s - grad / hess, 0.0)
        if abs(s_new - s) < 1e-9:
            break
        s = s_new
    return float(s)


def ece(probs: np.ndarray, target: np.ndarray, n_bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error: bin by predicted probability; the |mean predicted - mean target| of each
    bin, weighted by its share of pairs. Also returns the reliability table."""
    p, t = np.asarray(probs, float), np.asarray(target, float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    err, table = 0.0, []
    for k in range(n_bins):
        sel = bins == k
        if sel.any():
            gap = abs(p[sel].mean() - t[sel].mean())
            err += gap * sel.mean()
            table.append({"bin": f"{k / n_bins:.1f}-{(k + 1) / n_bins:.1f}", "n": int(sel.sum()),
                          "predicted": round(float(p[sel].mean()), 4), "raters": round(float(t[sel].mean()), 4)})
    return float(err), table


def one_rater_r(ratings: Sequence[Sequence[float]]) -> float:
    """Mean over rater positions k of Pearson(rating k, mean of the item's other ratings), across items."""
    n_min = min(len(r) for r in ratings)
    rs = []
    for k in range(n_min):
        one = np.array([r[k] for r in ratings], float)
        rest = np.array([(sum(r) - r[k]) / (len(r) - 1) for r in ratings], float)
        rs.append(pearson(one, rest))
    return float(np.mean(rs))


def vader_scores(texts: Sequence[str]) -> np.ndarray:
    """The VADER lexicon's compound sentiment score in [-1, 1] per text."""
    from rlhfkit.eval.judges import vader_compound

    return np.array(vader_compound(texts), float)


def rating_metrics(scores: np.ndarray, ratings: Sequence[Sequence[float]], groups: Sequence[str],
                   scale: float | None, rng: np.random.Generator, n_cal_pairs: int = 20000) -> dict:
    """All agreement metrics of raw scores with rated texts. `scale` = the preference scale to use for
    calibration (None: fit it here, which is only fair on a validation split)."""
    means = np.array([np.mean(r) for r in ratings])
    pm = pairwise_accuracy(scores, means, 1.0, groups)
    a, b = sample_pairs(groups, n_cal_pairs, rng)
    target = np.array([rater_preference(ratings[i], ratings[j]) for i, j in zip(a, b)])
    diffs = scores[a] - scores[b]
    s = preference_scale(diffs, target) if scale is None else scale
    cal, table = ece(_sigmoid(s * diffs), target)
    return {"pearson": pearson(scores, means), "spearman": spearman(scores, means),
            "pair_acc_gap1": pm["pair_acc"], "pair_acc_gap1_lo": pm["pair_acc_lo"],
            "pair_acc_gap1_hi": pm["pair_acc_hi"], "ties_gap1": pm["ties"],
            "pair_acc_gap1_ties_half": pm["pair_acc_ties_half"], "n_pairs_gap1": pm["n_pairs"],
            "ece": cal, "preference_scale": s,
            # The raw scores of a Bradley-Terry model are logits: how calibrated are they untouched?
            "ece_raw": ece(_sigmoid(diffs), target)[0], "n": len(scores), "reliability": table}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -50, 50)))
