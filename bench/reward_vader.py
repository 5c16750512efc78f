"""Reward models on real human ratings (vader movie snippets): agreement, calibration, time.

    python bench/reward_vader.py --out runs/bench-reward                         # default variants
    python bench/reward_vader.py --variants linear-minilm,deep-minilm --bf16     # some, bf16 on AMX CPUs
    python bench/reward_vader.py --lm runs/pretrain/final                        # + variants on our own LM

Every variant is one `rlhfkit reward` run with the same held-out split (data.split_seed 0: 10% of the
items, chosen by a hash of the item id); a variant whose run directory already holds summary.json is read,
not re-run. Prints (and writes to <out>/results.md) a table of: test Pearson and Spearman r with the
human mean rating, pairwise accuracy on test pairs whose human means differ by >= 1 point, calibration
(ECE of sigmoid(s * (r_a - r_b)) against the raters' empirical preference, s fitted on validation),
training time, and the time one reward call takes for 64 completions of ~32 tokens (a PPO step's batch).
Baselines on the very same test snippets: the VADER lexicon's compound score and one human rater vs the
mean of the others (leave-one-rater-out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (flags of `rlhfkit reward`, needs --lm)
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "linear-minilm": (["--model.kind", "linear"], False),
    "linear-minilm-bt": (["--model.kind", "linear", "--loss.kind", "bt"], False),
    "linear-minilm-l4": (["--model.kind", "linear", "--model.layers", "4"], False),
    "linear-minilm-l0": (["--model.kind", "linear", "--model.layers", "0"], False),
    "linear-lm": (["--model.kind", "linear", "--model.backbone", "{lm}"], True),
    "deep-minilm": (["--model.kind", "deep", "--epochs", "3", "--optim.lr", "5e-5"], False),
    "deep-minilm-cls": (["--model.kind", "deep", "--model.pooling", "cls", "--epochs", "3", "--optim.lr", "5e-5"],
                        False),
    "deep-minilm-bt": (["--model.kind", "deep", "--loss.kind", "bt", "--loss.per_item", "2", "--epochs", "0.75",
                        "--optim.lr", "5e-5"], False),
    "lora-minilm": (["--model.kind", "deep", "--model.lora_r", "16", "--model.lora_alpha", "32", "--epochs", "3",
                     "--optim.lr", "5e-4"], False),
    "deep-lm": (["--model.kind", "deep", "--model.backbone", "{lm}", "--model.pooling", "mean", "--epochs", "3",
                 "--optim.lr", "3e-4"], True),
}
DEFAULT = ["linear-minilm", "linear-minilm-bt", "linear-minilm-l4", "linear-minilm-l0", "linear-lm", "deep-minilm",
           "deep-minilm-cls", "deep-minilm-bt", "lora-minilm", "deep-lm"]


def run_variant(name: str, out: Path, lm: str, bf16: bool, threads: int) -> dict | None:
    flags, needs_lm = VARIANTS[name]
    if needs_lm and not lm:
        print(f"{name}: skipped (needs --lm, a pretrained LM directory)")
        return None
    run_dir = out / name
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "rlhfkit", "reward", *[f.format(lm=lm) for f in flags],
               "--data.domains", "movie", "--log.run_dir", str(run_dir), "--log.progress", "false",
               "--run.threads", str(threads)]
        if bf16 and "deep" in flags:
            cmd += ["--model.bf16", "true"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(summary.read_text())


def time_reward_call(model_dir: str, texts: list[str], repeats: int = 10) -> dict[str, float]:
    """Median seconds of one reward call on the given completions (after two warm-up calls), with the
    encoder / backbone in float32 and under bfloat16 autocast."""
    from rlhfkit.models.reward import load_reward

    rm = load_reward(model_dir)
    prompts = [""] * len(texts)
    out = {}
    for bf16 in (False, True):
        if hasattr(rm, "encoder"):
            rm.encoder.bf16 = bf16
        else:
            rm.bf16 = bf16
        for _ in range(2):
            rm(prompts, texts)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            rm(prompts, texts)
            times.append(time.perf_counter() - t)
        out["bf16" if bf16 else "fp32"] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-reward", help="directory of the variants' runs and the results")
    p.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--lm", default="", help="a pretrained LM directory (rlhfkit pretrain's final/) for the "
                                            "*-lm variants")
    p.add_argument("--bf16", action="store_true", help="train and score deep variants under bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lm = str(Path(args.lm).resolve()) if args.lm else ""

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rlhfkit.data.reward_data import split_of
    from rlhfkit.data.sources import vader_items
    from rlhfkit.eval import reward_metrics as M

    # Baselines on the held-out movie snippets (the split every variant uses).
    items = [it for it in vader_items(["movie"]) if split_of(it.id, 0.1, 0.05, 0) == "test"]
    means = [it.mean for it in items]
    vader_r = M.pearson(M.vader_scores([it.text for it in items]), means)
    human_r = M.one_rater_r([it.ratings for it in items])
    # 64 completions of ~32 tokens: the first 24 words of 64 test snippets.
    probe = [" ".join(it.text.split()[:24]) for it in items[:64]]

    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        s = run_variant(name, out, lm, args.bf16, args.threads)
        if s is None:
            continue
        m = s["test"]["movie"]
        rows.append({"variant": name, "pearson": m["pearson"], "spearman": m["spearman"],
                     "pair_acc_gap1": m["pair_acc_gap1"], "n_pairs": m["n_pairs_gap1"], "ece": m["ece"],
                     "ece_raw": m.get("ece_raw"), "train_s": s.get("train_s"), "wall_s": s.get("wall_s"),
                     "call_s_64": time_reward_call(s["model"], probe), "model": s["model"]})
        print(json.dumps(rows[-1]), flush=True)

    lines = [(f"Held-out movie snippets: {len(items)} (10% of 10,605 by item hash, split_seed 0); "
             f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}"), "",
             ("| reward model | Pearson r | Spearman | pair acc (gap >= 1) | ECE | train time | "
             "64-completion call fp32 / bf16 |"),
             "|---|---|---|---|---|---|---|",
             f"| VADER lexicon (compound) | {vader_r:.3f} | | | | | |",
             f"| one human rater vs mean of the others | {human_r:.3f} | | | | | |"]
    for r in rows:
        c = r["call_s_64"]
        lines.append(f"| {r['variant']} | {r['pearson']:.3f} | {r['spearman']:.3f} | {r['pair_acc_gap1']:.3f} "
                     f"| {r['ece']:.4f} | {r['train_s']:.0f} s | {c['fp32'] * 1000:.0f} / {c['bf16'] * 1000:.0f} ms |")
    if rows:
        lines.append(f"\nPairs with a human-mean gap >= 1 among the test snippets: {rows[0]['n_pairs']}.")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"vader_lexicon_r": vader_r, "one_rater_r": human_r,
                                                  "n_test": len(items), "rows": rows}, indent=1))


def cpu_name() -> str:
    from rlhfkit.utils.runtime import cpu_model

    return f"{cpu_model()} x {os.cpu_count()}"


if __name__ == "__main__":
    main()
