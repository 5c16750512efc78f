"""A preference set of long multi-turn dialogues from the chatterbot corpus, for reward models.

    rlhfkit data fetch chatterbot                                    # once: the corpus wheel, offline after
    python bench/reward_long_dialogues.py --out runs/long-dialogues  # writes train.jsonl.gz, test.jsonl.gz

Construction (seeded, so the files are the same on every machine): every consecutive turn pair (q, a) of
the corpus's English dialogues (2,377) gives one pair record. Its prompt is a dialogue history followed by
q: k other exchanges drawn at random from the whole corpus ("User: ...\\nBot: ...\\n" each), k uniform in
0..12 (--max-history), then "User: q\\nBot:". chosen = " " + a, the corpus's own reply; rejected = " " + the reply of a
random exchange from another category (an off-topic answer). The replies are short, the prompts often
longer than 128 tokens, so a reward model that cuts texts from the right sees the same text for both.
Records are split 80 / 20 into train and test files by a hash of their item_id.

Then, for example:

    rlhfkit reward --data.source runs/long-dialogues/train.jsonl.gz --loss.kind bt \\
        --data.test_fraction 0 --eval.file runs/long-dialogues/test.jsonl.gz
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np


def build(seed: int = 0, max_history: int = 12) -> list[dict]:
    from rlhfkit.data.sources import chatterbot_pairs

    turns = chatterbot_pairs()
    rng = np.random.default_rng(seed)
    cats = np.array([t["category"] for t in turns])
    out = []
    for i, t in enumerate(turns):
        k = int(rng.integers(0, max_history + 1))
        hist = "".join(f"User: {turns[j]['prompt']}\nBot: {turns[j]['response']}\n"
                       for j in rng.integers(0, len(turns), k))
        other = np.flatnonzero(cats != t["category"])
        wrong = turns[int(rng.choice(other))]["response"]
        out.append({"prompt": f"{hist}User: {t['prompt']}\nBot:", "chosen": " " + t["response"],
                    "rejected": " " + wrong, "item_id": f"chatterbot-{i}", "annotator": "construction"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/long-dialogues", help="directory for train.jsonl.gz, test.jsonl.gz")
    ap.add_argument("--seed", type=int, default=0, help="seed of the histories and the off-topic replies")
    ap.add_argument("--max-history", type=int, default=12,
                    help="most earlier exchanges before the judged one (40: nearly every text > 512 tokens, "
                         "the worst case for memory)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = build(a.seed, a.max_history)
    is_test = [hashlib.blake2b(r["item_id"].encode(), digest_size=8).digest()[0] < 52 for r in recs]  # ~20%
    test = [r for r, t in zip(recs, is_test) if t]
    train = [r for r, t in zip(recs, is_test) if not t]
    for name, rows in (("train", train), ("test", test)):
        text = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
        (out / f"{name}.jsonl.gz").write_bytes(gzip.compress(text, mtime=0))  # the same bytes every time
    same = sum(r["chosen"] == r["rejected"] for r in recs)
    print(f"{len(train)} train and {len(test)} test pairs ({same} with identical replies) in {out}")


if __name__ == "__main__":
    main()
