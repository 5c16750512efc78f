"""Reward-model training data: rated texts and best-first rankings, from vader or feedback exports.

Everything is brought to two shapes:
  RatedText  one text (prompt + completion) with the individual human ratings it got;
  Ranking    completions of one prompt, best first: an export's pair (K = 2), ranking (K) or edit
             (edited over original, K = 2).
Pairs and rankings for the comparison losses are also drawn from rated texts (`rated_pairs`,
`rated_groups`), within a domain, between texts whose mean ratings differ by at least a gap.

The held-out split is by item (`split_of`): a hash of the split seed and the item's key decides, so an
item is in the same split whatever else is loaded (a movie test snippet stays a test snippet when tweets
are added) and no rating, pair or ranking of a test item is ever trained on.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlhfkit.data.sources import VADER_DOMAINS, read_jsonl_records, read_text_file, vader_items
from rlhfkit.errors import DataError


@dataclass
class RatedText:
    key: str                    # split unit: vader id, or the export's item_id
    domain: str                 # vader domain, or "feedback"
    prompt: str
    completion: str
    ratings: list[float]        # the ratings trained on (the selected raters)
    all_ratings: list[float] = field(default_factory=list)  # every rating (the evaluation target)

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    @property
    def mean(self) -> float:
        return float(np.mean(self.ratings))

    @property
    def eval_mean(self) -> float:
        return float(np.mean(self.all_ratings or self.ratings))


@dataclass
class Ranking:
    key: str
    prompt: str
    completions: list[str]      # best first
    margin: float = 0.0         # an export pair's margin field (>= 0)
    source: str = "pair"        # pair, ranking or edit


@dataclass
class RewardData:
    rated: list[RatedText] = field(default_factory=list)
    rankings: list[Ranking] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # e.g. ties, which BT cannot use


def rater_half(ratings: list, raters: str) -> list:
    """all, or the even / odd rater columns: two disjoint halves of every item's raters."""
    return {"all": ratings, "even": ratings[0::2], "odd": ratings[1::2]}[raters]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_reward_data(sources: list[str], domains: list[str], raters: str = "all") -> RewardData:
    """Load every source: 'vader' (the given domains) and feedback export files (kind read from fields)."""
    data = RewardData()
    for src in sources:
        if src == "vader":
            for d in domains:
                if d not in VADER_DOMAINS:
                    raise DataError(f"unknown vader domain {d!r}; choose from {', '.join(VADER_DOMAINS)}")
            for it in vader_items(domains):
                data.rated.append(RatedText(it.id, it.domain, "", it.text,
                                            [float(r) for r in rater_half(it.ratings, raters)],
                                            [float(r) for r in it.ratings]))
        elif src.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            _load_export(Path(src), raters, data)
        else:
            raise DataError(f"reward data source {src!r}: expected 'vader' or a feedback export file (.jsonl, "
                            ".json, or either gzipped: .jsonl.gz)")
    if not data.rated and not data.rankings:
        raise DataError(f"no reward training data in {', '.join(sources)}")
    return data


# Fields that tell an export's kind (docs/formats.md), and the string fields each kind needs.
_KINDS = {"rating": ("ratings", ("prompt", "completion")), "chosen": ("pairs", ("prompt", "chosen", "rejected")),
          "completions": ("rankings", ("prompt",)), "edited": ("edits", ("prompt", "original", "edited"))}


def _load_export(path: Path, raters: str, data: RewardData) -> None:
    records = read_jsonl_records(path)
    first = records[0]
    kind, required = next((v for k, v in _KINDS.items() if k in first), (None, ()))
    if kind is None:
        raise DataError(f"{path}:1: cannot tell the export kind: expected a 'rating', 'chosen', 'completions' or "
                        f"'edited' field (docs/formats.md), got {', '.join(first) or 'no fields'}")
    records = read_jsonl_records(path, required)  # again, now checking the kind's string fields
    if not path.name.endswith((".json", ".json.gz")):
        lines = [i for i, ln in enumerate(read_text_file(path).splitlines(), 1) if ln.strip()]
        where = [f"{path}:{i}" for i in lines]
    else:
        where = [f"{path}: item {i}" for i in range(len(records))]
    # Rater halves of an export: annotators in sorted order, even or odd positions.
    names = sorted({str(r.get("annotator", "")) for r in records})
    keep = set(rater_half(names, raters))
    by_item: dict[str, RatedText] = {}
    for w, r in zip(where, records):
        if str(r.get("annotator", "")) not in keep:
            continue
        if kind == "ratings":
            rating = r["rating"]
            if isinstance(rating, bool) or not isinstance(rating, (int, float)):
                raise DataError(f"{w}: 'rating' must be a number, got {rating!r}")
            key = str(r.get("item_id") or _text_key(r["prompt"] + r["completion"]))
            item = by_item.get(key)
            if item is None:
                item = by_item[key] = RatedText(key, "feedback", r["prompt"], r["completion"], [])
                data.rated.append(item)
            elif (item.prompt, item.completion) != (r["prompt"], r["completion"]):
                raise DataError(f"{w}: item_id {key!r} was used before for a different prompt/completion")
            item.ratings.append(float(rating))
        elif kind == "pairs":
            if r.get("tie"):
                data.skipped["tie"] = data.skipped.get("tie", 0) + 1
                continue
            margin = r.get("margin", 0.0) or 0.0
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
                raise DataError(f"{w}: 'margin' must be a number >= 0, got {margin!r}")
            data.rankings.append(Ranking(_comparison_key(r, r["chosen"]), r["prompt"], [r["chosen"], r["rejected"]],
                                         float(margin), str(r.get("source") or "pair")))
        elif kind == "rankings":
            comps = r["completions"]
            if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
                raise DataError(f"{w}: 'completions' must be a list of at least 2 strings, best first")
            data.rankings.append(Ranking(_comparison_key(r, comps[0]), r["prompt"], list(comps), source="ranking"))
        else:  # edits: the annotator's rewrite is preferred to what they were shown
            if r["edited"] == r["original"]:
                data.skipped["unchanged edit"] = data.skipped.get("unchanged edit", 0) + 1
                continue
            data.rankings.append(Ranking(_comparison_key(r, r["original"]), r["prompt"],
                                         [r["edited"], r["original"]], source="edit"))
    for item in by_item.values():
        item.all_ratings = list(item.ratings)


def _text_key(text: str) -> str:
    return "text:" + hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _comparison_key(r: dict, text: str) -> str:
    """Split unit of a comparison: its item_id, else its prompt, else (a free-standing pair) one of its texts."""
    if r.get("item_id"):
        return str(r["item_id"])
    return "prompt:" + r["prompt"] if r["prompt"] else _text_key(text)


# --------------------------------------------------------------------------------------------------
# Split by item
# --------------------------------------------------------------------------------------------------
def split_of(key: str, test_fraction: float, val_fraction: float, seed: int) -> str:
    """'train', 'val' or 'test' for an item key, from a hash: stable across runs and data mixes."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


# --------------------------------------------------------------------------------------------------
# Comparisons drawn from rated texts
# --------------------------------------------------------------------------------------------------
def rated_pairs(items: list[RatedText], per_item: int, min_gap: float,
                rng: np.random.Generator) -> list[tuple[int, int, float]]:
    """(better, worse, mean difference) index pairs: each item meets `per_item` random partners of its
    own domain; pairs closer than min_gap in mean rating are dropped (they are mostly rater noise)."""
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_domain[it.domain].append(i)
    means = np.array([it.mean for it in items])
    out = []
    for idx in by_domain.values():
        idx = np.array(idx)
        if len(idx) < 2:
            continue
        a = np.repeat(idx, per_item)
        b = idx[rng.integers(0, len(idx), len(a))]
        gap = means[a] - means[b]
        ok = np.abs(gap) >= max(min_gap, 1e-9)
        for i, j, g in zip(a[ok], b[ok], gap[ok]):
            out.append((int(i), int(j), float(g)) if g > 0 else (int(j), int(i), float(-g)))
    rng.shuffle(out)
    return out


def rated_groups(items: list[RatedText], n_groups: int, k: int, min_gap: float,
                 rng: np.random.Generator) -> list[list[int]]:
    """Rankings of k items of one domain, best first, with every two means at least min_gap apart."""
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_domain[it.domain].append(i)
    domains = [d for d, v in by_domain.items() if len(v) >= k]
    if not domains:
        return []
    sizes = np.array([len(by_domain[d]) for d in domains], dtype=float)
    means = np.array([it.mean for it in items])
    groups = []
    for d in rng.choice(len(domains), n_groups, p=sizes / sizes.sum()):
        pool = by_domain[domains[d]]
        chosen: list[int] = []
        for c in rng.choice(pool, min(len(pool), 8 * k), replace=False):
            if all(abs(means[c] - means[o]) >= min_gap for o in chosen):
                chosen.append(int(c))
                if len(chosen) == k:
                    break
        if len(chosen) >= 2:
            groups.append(sorted(chosen, key=lambda i: -means[i]))
    return groups


def write_split(path: Path, splits: dict[str, str], seed: int, test_fraction: float, val_fraction: float) -> None:
    """Record which items were held out (the test ids are the contract: never train on them)."""
    out = {"seed": seed, "test_fraction": test_fraction, "val_fraction": val_fraction,
           "test": sorted(k for k, s in splits.items() if s == "test"),
           "val": sorted(k for k, s in splits.items() if s == "val"),
           "n_train": sum(s == "train" for s in splits.values())}
    path.write_text(json.dumps(out, indent=0))
