"""Agreement of real people vs simulated labelers on the VADER data.

1. Krippendorff's alpha (interval, ordinal) of the real per-rater VADER ratings, per domain (units =
   snippets; raters differ between snippets, which alpha allows) and for the lexicon (units = words).
2. On a random sample of snippets per domain: `--raters` simulated vader-raters (seeds 0..R-1) rate
   every snippet on -4..+4 through the feedback store; we report their alpha next to the humans' alpha
   on the same snippets, and how well the simulated mean follows the human mean (Pearson r).

    PYTHONPATH=src python bench/feedback_agreement.py [--snippets 300] [--raters 10]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import defaultdict

import numpy as np

from rlhfkit.data.sources import VADER_DOMAINS, vader_items
from rlhfkit.feedback.agreement import krippendorff_alpha, vader_alpha
from rlhfkit.feedback.export import records
from rlhfkit.feedback.labelers import VaderRater, run_labeler
from rlhfkit.feedback.store import Store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snippets", type=int, default=300, help="random snippets per domain for part 2")
    p.add_argument("--raters", type=int, default=10, help="simulated raters per snippet")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    t0 = time.time()
    print("1. Real human ratings")
    print(f"{'data':<18} {'units':>6} {'ratings':>8} {'alpha interval':>15} {'alpha ordinal':>14}")
    for r in vader_alpha():
        print(f"{r['data']:<18} {r['units']:>6} {r['ratings']:>8} {r['alpha_interval']:>15.3f} "
              f"{r['alpha_ordinal']:>14.3f}")
    print(f"({time.time() - t0:.1f} s)\n")

    print(f"2. {a.raters} simulated vader-raters vs the humans, {a.snippets} random snippets per domain")
    print(f"{'domain':<8} {'human alpha':>12} {'simulated alpha':>16} {'r(sim mean, human mean)':>24} "
          f"{'s':>6}")
    labelers = [VaderRater(seed) for seed in range(a.raters)]
    for d in VADER_DOMAINS:
        t1 = time.time()
        items = random.Random(a.seed).sample(vader_items([d]), a.snippets)
        with tempfile.TemporaryDirectory() as tmp:
            st = Store(f"{tmp}/fb.db")
            st.import_samples([{"prompt": "", "completion": it.text, "id": it.id} for it in items],
                              project=d, overlap=a.raters, scale=(-4, 4))
            for lab in labelers:
                run_labeler(st, lab, project=d, round=1)
            sim: dict[str, list[float]] = defaultdict(list)
            for r in records(st, d, do_clean=False)["ratings"]:
                sim[r["item_id"]].append(r["rating"])
            st.close()
        items = [it for it in items if it.id in sim]   # (a snippet whose text repeats is imported once)
        human = krippendorff_alpha([it.ratings for it in items], "interval")
        simulated = krippendorff_alpha(list(sim.values()), "interval")
        r = np.corrcoef([np.mean(sim[it.id]) for it in items], [it.mean for it in items])[0, 1]
        print(f"{d:<8} {human:>12.3f} {simulated:>16.3f} {r:>24.3f} {time.time() - t1:>6.1f}")


if __name__ == "__main__":
    main()
