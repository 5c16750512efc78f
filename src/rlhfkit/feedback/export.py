"""Export the store's live answers as the JSONL files of docs/formats.md (and HF `datasets`).

    ratings    {prompt, completion, rating, annotator, item_id, scale_min, scale_max}
    pairs      {prompt, chosen, rejected, source, annotator, tie}: pair choices (ties kept, tie=true),
               every ranking expanded to all K(K-1)/2 pairs (source=ranking), every edit as
               edited > original (source=edit)
    rankings   {prompt, completions (best first), annotator}
    edits      {prompt, original, edited, annotator}

Every record also carries `project`, `round` and `task` (the store's item id). Undone answers are left
out. Cleaning (on by default) normalises whitespace, drops records whose texts are empty (or whose two
sides are the same text) and drops exact duplicates (same annotator, same texts, same judgement).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from rlhfkit.feedback.store import (
    Annotator,
    Choice,
    Edit,
    Item,
    ItemSample,
    Project,
    RankEntry,
    Rating,
    Round,
    Sample,
    Store,
    Submission,
    _narrow,
)

EXPORT_KINDS = ("ratings", "pairs", "rankings", "edits")


def _sample_key(s: Sample) -> str:
    return s.external_id or f"s{s.id}"


def _live(q: Any, project: str, round: int | None) -> Any:
    """Restrict a query over Submission to live answers of a project (and round)."""
    q = (q.join(Item, Item.id == Submission.item_id).join(Round, Round.id == Item.round_id)
         .join(Annotator, Annotator.id == Submission.annotator_id)
         .where(Submission.retracted_at.is_(None)))
    return _narrow(q, project, round).order_by(Submission.id)


def raw_records(store: Store, project: str, round: int | None = None) -> dict[str, list[dict]]:
    """Uncleaned records of every kind, straight from the live answers."""
    out: dict[str, list[dict]] = {k: [] for k in EXPORT_KINDS}
    with store.read() as s:
        store._project(s, project)  # a clear error for an unknown project
        if round is not None:
            store._round(s, store._project(s, project), round)
        samples: dict[int, Sample] = {}

        def sample(i: int) -> Sample:
            if i not in samples:
                samples[i] = s.get(Sample, i)
            return samples[i]

        base = lambda sub, ann, rnd, item: {"annotator": ann.name, "round": rnd.number,
                                             "project": project, "task": item.id, "prompt": item.prompt.text}
        proj = s.scalar(select(Project).where(Project.name == project))
        q = _live(select(Submission, Annotator, Round, Item, Rating)
                  .join(Rating, Rating.submission_id == Submission.id), project, round)
        for sub, ann, rnd, item, rt in s.execute(q):
            smp = sample(rt.sample_id)
            out["ratings"].append({**base(sub, ann, rnd, item), "completion": smp.text, "rating": rt.value,
                                   "item_id": _sample_key(smp), "scale_min": proj.scale_min,
                                   "scale_max": proj.scale_max})
        q = _live(select(Submission, Annotator, Round, Item, Choice)
                  .join(Choice, Choice.submission_id == Submission.id), project, round)
        for sub, ann, rnd, item, ch in s.execute(q):
            out["pairs"].append({**base(sub, ann, rnd, item), "chosen": sample(ch.chosen_sample_id).text,
                                 "rejected": sample(ch.rejected_sample_id).text, "source": "pair",
                                 "tie": bool(ch.tie)})
        ranks: dict[int, list[int]] = defaultdict(list)
        subs: dict[int, tuple] = {}
        q = _live(select(Submission, Annotator, Round, Item, RankEntry)
                  .join(RankEntry, RankEntry.submission_id == Submission.id), project, round)
        for sub, ann, rnd, item, re_ in s.execute(q.order_by(RankEntry.rank)):
            ranks[sub.id].append(re_.sample_id)
            subs[sub.id] = (sub, ann, rnd, item)
        for sid, order in ranks.items():
            b = base(*subs[sid])
            texts = [sample(i).text for i in order]
            out["rankings"].append({**b, "completions": texts})
            # All K(K-1)/2 pairs: every completion beats everything ranked below it.
            for i in range(len(texts)):
                for j in range(i + 1, len(texts)):
                    out["pairs"].append({**b, "chosen": texts[i], "rejected": texts[j], "source": "ranking",
                                         "tie": False})
        q = _live(select(Submission, Annotator, Round, Item, Edit)
                  .join(Edit, Edit.submission_id == Submission.id), project, round)
        for sub, ann, rnd, item, ed in s.execute(q):
            b = base(sub, ann, rnd, item)
            out["edits"].append({**b, "original": ed.original, "edited": ed.edited})
            out["pairs"].append({**b, "chosen": ed.edited, "rejected": ed.original, "source": "edit",
                                 "tie": False})
    return out


def normalize_ws(text: str) -> str:
    """Unicode spaces -> ' ', runs of spaces/tabs inside a line -> one space (leading indentation kept),
    no trailing spaces, at most one blank line in a row, no blank space at either end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\u00a0\u2000-\u200b\u202f\u205f\u3000]", " ", text)
    lines = []
    for ln in text.split("\n"):
        indent = ln[:len(ln) - len(ln.lstrip(" \t"))]
        lines.append(indent + re.sub(r"[ \t]+", " ", ln.strip(" \t")))
    text = "\n".join(ln if ln.strip() else "" for ln in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_TEXT_FIELDS = {"ratings": ("completion",), "pairs": ("chosen", "rejected"), "rankings": (),
                "edits": ("original", "edited")}
_KEY_FIELDS = {"ratings": ("prompt", "completion", "annotator", "rating"),
               "pairs": ("prompt", "chosen", "rejected", "annotator", "tie", "source"),
               "rankings": ("prompt", "completions", "annotator"),
               "edits": ("prompt", "original", "edited", "annotator")}


def clean(records: Iterable[dict], kind: str) -> tuple[list[dict], dict[str, int]]:
    """Normalise whitespace, drop empty / degenerate records and exact duplicates. Returns the kept
    records and counts of what was dropped."""
    kept, seen = [], set()
    dropped = {"empty": 0, "same_text": 0, "duplicate": 0}
    for r in records:
        r = dict(r)
        r["prompt"] = normalize_ws(r.get("prompt", ""))
        for f in _TEXT_FIELDS[kind]:
            r[f] = normalize_ws(r[f])
        if kind == "rankings":
            r["completions"] = [normalize_ws(c) for c in r["completions"]]
        texts = [r[f] for f in _TEXT_FIELDS[kind]] + r.get("completions", [])
        if any(not t for t in texts):
            dropped["empty"] += 1
            continue
        if (kind in ("pairs", "edits") and texts[0] == texts[1]) or \
                (kind == "rankings" and len(set(texts)) < len(texts)):
            dropped["same_text"] += 1
            continue
        key = tuple(json.dumps(r[f], sort_keys=True) for f in _KEY_FIELDS[kind])
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(r)
    return kept, dropped


def records(store: Store, project: str, round: int | None = None, *,
            do_clean: bool = True) -> dict[str, list[dict]]:
    """Export records of every kind (cleaned unless do_clean=False)."""
    raw = raw_records(store, project, round)
    return {k: clean(v, k)[0] if do_clean else v for k, v in raw.items()}


def write_jsonl(recs: list[dict], path: str | Path) -> None:
    """Write records atomically (a crash never leaves half a file under the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    os.replace(tmp, path)


def export(store: Store, project: str, out_dir: str | Path, round: int | None = None, *,
           kinds: Iterable[str] = EXPORT_KINDS, fmt: str = "jsonl", do_clean: bool = True) -> dict[str, dict]:
    """Write <out_dir>/<kind>.jsonl (or an HF dataset directory per kind with fmt="hf").

    Returns {kind: {"path", "records", "dropped"}}."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in EXPORT_KINDS]
    if bad:
        from rlhfkit.errors import ConfigError

        raise ConfigError(f"unknown export kind(s) {bad}; choose from {', '.join(EXPORT_KINDS)}")
    raw = raw_records(store, project, round)
    out_dir = Path(out_dir)
    summary = {}
    for k in kinds:
        recs, dropped = clean(raw[k], k) if do_clean else (raw[k], {})
        if fmt == "hf":
            path = out_dir / k
            to_hf_dataset(recs).save_to_disk(str(path))
        elif fmt == "jsonl":
            path = out_dir / f"{k}.jsonl"
            write_jsonl(recs, path)
        else:
            from rlhfkit.errors import ConfigError

            raise ConfigError(f"unknown export format {fmt!r}; choose jsonl or hf")
        summary[k] = {"path": str(path), "records": len(recs), "dropped": dropped}
    return summary


def to_hf_dataset(recs: list[dict]):
    """A `datasets.Dataset` of records (needs the `datasets` package: pip install rlhfkit[hf])."""
    try:
        import datasets
    except ImportError:
        from rlhfkit.errors import ConfigError

        raise ConfigError("HF export needs the `datasets` package (pip install 'rlhfkit[hf]')") from None
    return datasets.Dataset.from_list(recs)


def round_samples(store: Store, project: str, round: int | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) of every sample in tasks of a project (or one round)."""
    with store.read() as s:
        q = (select(Item.id, Sample).join(ItemSample, ItemSample.item_id == Item.id)
             .join(Sample, Sample.id == ItemSample.sample_id).join(Round, Round.id == Item.round_id))
        seen, out = set(), []
        for _, smp in s.execute(_narrow(q, project, round)):
            if smp.id not in seen:
                seen.add(smp.id)
                out.append((smp.prompt.text, smp.text))
        return out
