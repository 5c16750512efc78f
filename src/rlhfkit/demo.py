"""`rlhfkit demo` (what `make demo` runs): the whole pipeline, offline, on data shipped in PyPI packages.

  1. pretrain  a tiny Llama-architecture LM on the 23.7K VADER snippets (movie and Amazon reviews, NYT
               editorials, tweets);
  2. reward    two reward models on the real human ratings of movie snippets: the *proxy* learns from half
               of the raters, the *gold* from the other half (and other features), Gao et al. 2022 style;
  3. ppo       fine-tune the LM to continue movie-review openings so that the proxy scores them higher,
               with a KL penalty to the pretrained model;
  4. eval      on openings of held-out movie snippets (test items of the reward models, never trained on):
               proxy and gold reward, the VADER lexicon as an independent judge, KL, before vs after; and
               the over-optimisation curve: proxy and gold reward of PPO's checkpoints vs their KL;
  5. report    runs/demo/report.html with the plots, and runs/demo/summary.json with the headline numbers.

`--preset smollm2` (`make demo-smollm2`) starts from the real SmolLM2-135M-Instruct instead of stage 1, with
LoRA PPO sized for 2 CPU cores (config.DEMO_PRESETS); `--base_model DIR` starts from any pretrained LM.

Each stage writes into its own directory under run_dir and is skipped when it has finished before, so an
interrupted demo continues where it stopped (a stage cut off mid-way resumes from its checkpoint).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rlhfkit.config import DemoConfig


def _done(d: Path) -> dict | None:
    f = d / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def _stage(name: str, d: Path, fn: Any, cfg: Any, log: list[str]) -> dict:
    """Run a stage unless it finished before; returns its summary."""
    prev = _done(d)
    if prev is not None:
        print(f"== {name}: done before ({d}/summary.json), skipping", flush=True)
        return prev
    print(f"== {name} -> {d}", flush=True)
    t = time.time()
    out = fn(cfg) or {}
    log.append(f"{name}: {time.time() - t:.0f}s")
    return _done(d) or out


def _prompt_files(run_dir: Path, split_json: Path, words: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Openings of movie snippets as prompts: training prompts from the reward models' train items, eval
    prompts from their test items (so no stage ever saw an eval prompt's snippet)."""
    import numpy as np

    from rlhfkit.data.sources import vader_items

    test_ids = set(json.loads(split_json.read_text())["test"])
    val_ids = set(json.loads(split_json.read_text()).get("val", []))
    train, test = [], []
    for it in vader_items(["movie"]):
        opening = " ".join(it.text.split()[:words])
        if len(it.text.split()) <= words + 2:
            continue  # too short to leave anything to continue
        (test if it.id in test_ids else [] if it.id in val_ids else train).append(opening)
    rng = np.random.default_rng(seed)
    test = [test[i] for i in rng.permutation(len(test))[:n_eval]]
    paths = run_dir / "prompts-train.txt", run_dir / "prompts-eval.txt"
    paths[0].write_text("\n".join(train) + "\n")
    paths[1].write_text("\n".join(test) + "\n")
    return paths


def run(cfg: DemoConfig) -> dict[str, Any]:
    from rlhfkit.eval.evaluate import evaluate
    from rlhfkit.eval.report import build_report
    from rlhfkit.rl.ppo import train as ppo_train
    from rlhfkit.train.pretrain import train as pretrain_train
    from rlhfkit.train.reward import train as reward_train

    t0 = time.time()
    root = Path(cfg.run_dir)
    if cfg.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    timings: list[str] = []

    # 1. Pretrain (unless the demo starts from a pretrained LM: --base_model, --preset smollm2).
    if cfg.base_model:
        pre, policy0 = {}, cfg.base_model
        print(f"== pretrain: skipped, starting from {policy0}", flush=True)
    else:
        cfg.pretrain.log.run_dir = str(root / "pretrain")
        pre = _stage("pretrain", root / "pretrain", pretrain_train, cfg.pretrain, timings)
        policy0 = str(root / "pretrain" / "final")

    # 2. Reward models: proxy and gold learn from disjoint halves of the raters.
    cfg.proxy.log.run_dir, cfg.gold.log.run_dir = str(root / "rm-proxy"), str(root / "rm-gold")
    proxy = _stage("reward model (proxy)", root / "rm-proxy", reward_train, cfg.proxy, timings)
    gold = _stage("reward model (gold)", root / "rm-gold", reward_train, cfg.gold, timings)

    # 3. PPO on openings of training snippets, rewarded by the proxy.
    train_prompts, eval_prompts = _prompt_files(root, root / "rm-proxy" / "split.json", cfg.prompt_words,
                                                cfg.eval.data.max_prompts, cfg.pretrain.run.seed)
    cfg.ppo.model.name_or_path = policy0
    cfg.ppo.reward.spec = str(root / "rm-proxy" / "final")
    cfg.ppo.data.source = str(train_prompts)
    cfg.ppo.log.run_dir = str(root / "ppo")
    if cfg.overopt_every:  # keep a checkpoint every overopt_every steps for the curve below
        cfg.ppo.log.save_every = cfg.overopt_every
        cfg.ppo.log.keep_checkpoints = cfg.ppo.optim.max_steps // cfg.overopt_every + 1
    ppo = _stage("ppo", root / "ppo", ppo_train, cfg.ppo, timings)

    # 4. Evaluation on held-out openings: before (pretrained) vs after (PPO).
    cfg.eval.policy, cfg.eval.reference = str(root / "ppo" / "final"), policy0
    cfg.eval.reward, cfg.eval.gold = str(root / "rm-proxy" / "final"), str(root / "rm-gold" / "final")
    cfg.eval.data.source = str(eval_prompts)
    cfg.eval.rollout.max_new_tokens = cfg.ppo.rollout.max_new_tokens
    cfg.eval.rollout.temperature = cfg.ppo.rollout.temperature
    cfg.eval.out = str(root / "eval" / "eval.json")
    ev_path = Path(cfg.eval.out)
    if ev_path.exists():
        print(f"== eval: done before ({ev_path}), skipping", flush=True)
        ev = json.loads(ev_path.read_text())
    else:
        print(f"== eval -> {ev_path}", flush=True)
        t = time.time()
        ev = evaluate(cfg.eval)
        timings.append(f"eval: {time.time() - t:.0f}s")

    # 4b. Over-optimisation: proxy and gold reward of every kept PPO checkpoint vs its KL (Gao et al. 2022).
    curve_path = root / "ppo" / "overopt.jsonl"
    if cfg.overopt_every and not curve_path.exists():
        from rlhfkit.eval.overopt import checkpoints, eval_config_for_curve, overopt_curve

        print(f"== over-optimisation curve -> {curve_path}", flush=True)
        t = time.time()
        curve_cfg = eval_config_for_curve(cfg.eval, cfg.overopt_prompts, 1)
        overopt_curve(checkpoints(root / "ppo"), curve_cfg, curve_path)
        # Scored: keep only the newest two, as PPO would have (the tiny demo's eleven hold ~1 GB).
        from rlhfkit.utils.checkpoint import list_checkpoints

        for old in list_checkpoints(root / "ppo")[:-2]:
            shutil.rmtree(old)
        timings.append(f"overopt: {time.time() - t:.0f}s")

    # 5. Summary and report.
    from rlhfkit.eval.metrics import intervals_overlap

    def trip(key: str) -> tuple[float, float, float]:
        v = ev[key]
        return v["mean"], v["low"], v["high"]

    test = (proxy.get("test") or {}).get("movie") or next(iter((proxy.get("test") or {}).values()), {})
    summary = {
        "preset": cfg.preset, "base_model": policy0,
        "val_ppl": pre.get("val_ppl"), "unigram_val_ppl": pre.get("unigram_val_ppl"),
        "rm_pearson_heldout": test.get("pearson"),
        "rm_gold_pearson_heldout": ((gold.get("test") or {}).get("movie") or {}).get("pearson"),
        "judge_positive_rate_before": ev["judge_positive_rate_before"]["mean"],
        "judge_positive_rate_after": ev["judge_positive_rate_after"]["mean"],
        "judge_positive_rate_before_ci": [trip("judge_positive_rate_before")[1], trip("judge_positive_rate_before")[2]],
        "judge_positive_rate_after_ci": [trip("judge_positive_rate_after")[1], trip("judge_positive_rate_after")[2]],
        "gold_reward_before": ev["gold_reward_before"]["mean"], "gold_reward_after": ev["gold_reward_after"]["mean"],
        "gold_reward_before_ci": [trip("gold_reward_before")[1], trip("gold_reward_before")[2]],
        "gold_reward_after_ci": [trip("gold_reward_after")[1], trip("gold_reward_after")[2]],
        "proxy_reward_before": ev["proxy_reward_before"]["mean"], "proxy_reward_after": ev["proxy_reward_after"]["mean"],
        "kl_mean": ev["kl_mean"]["mean"], "kl_mean_ci": [ev["kl_mean"]["low"], ev["kl_mean"]["high"]],
        "judge_intervals_overlap": intervals_overlap(trip("judge_positive_rate_before"),
                                                     trip("judge_positive_rate_after")),
        "gold_intervals_overlap": intervals_overlap(trip("gold_reward_before"), trip("gold_reward_after")),
        "eval_prompts": ev["n_prompts"], "samples_per_prompt": ev["samples_per_prompt"],
        "ppo_steps": ppo.get("steps"), **_kl_and_fluency(root / "ppo", cfg.ppo.kl.target), "stage_times": timings,
        "wall_s": round(time.time() - t0, 1),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    report = build_report(root, title="rlhfkit demo")
    print("\n".join([
        "", "== rlhfkit demo: done",
        (f"pretrained LM      val perplexity {summary['val_ppl']:.1f} (unigram floor {summary['unigram_val_ppl']:.1f})"
         if summary["val_ppl"] is not None else f"pretrained LM      {policy0}"),
        (f"reward model       Pearson r {summary['rm_pearson_heldout']:.3f} with the human mean on held-out "
         f"movie snippets (gold RM: {summary['rm_gold_pearson_heldout']:.3f})"),
        (f"judge (VADER)      positive rate {_ci_str(ev['judge_positive_rate_before'])} -> "
         f"{_ci_str(ev['judge_positive_rate_after'])}"),
        f"gold reward        {_ci_str(ev['gold_reward_before'])} -> {_ci_str(ev['gold_reward_after'])}",
        f"proxy reward       {_ci_str(ev['proxy_reward_before'])} -> {_ci_str(ev['proxy_reward_after'])}",
        f"KL to pretrained   {_ci_str(ev['kl_mean'])} nats per completion",
        *_fluency_lines(summary),
        f"wall time          {summary['wall_s']:.0f}s ({', '.join(timings) or 'all stages done before'})",
        f"report             {report}", f"summary            {root / 'summary.json'}"]), flush=True)
    return summary


def _kl_and_fluency(ppo_dir: Path, target: float) -> dict[str, Any]:
    """How PPO held its KL target (second half of its steps), and fluency before (the pretrained model) vs
    after (the last checkpoint) from the over-optimisation curve: completion perplexity under the pretrained
    model, length, distinct-2."""
    from rlhfkit.eval.report import kl_hold
    from rlhfkit.utils.logging import read_jsonl

    out: dict[str, Any] = {}
    if target and (ppo_dir / "metrics.jsonl").exists():
        h = kl_hold(read_jsonl(ppo_dir / "metrics.jsonl"), target)
        if h:
            out.update({"ppo_kl_target": target, "ppo_kl_second_half_mean": h["second_half_mean"],
                        "ppo_kl_second_half_within_50pct": h["second_half_within_50pct"]})
    curve = read_jsonl(ppo_dir / "overopt.jsonl") if (ppo_dir / "overopt.jsonl").exists() else []
    if len(curve) >= 2:
        first, last = curve[0], curve[-1]
        out.update({"completion_ppl_under_base_before": first["ref_ppl"],
                    "completion_ppl_under_base_after": last["ref_ppl"],
                    "curve_length_before": first["length"]["mean"], "curve_length_after": last["length"]["mean"],
                    "curve_distinct_2_before": first["distinct_2"], "curve_distinct_2_after": last["distinct_2"],
                    "overopt_points": len(curve)})
    return out


def _fluency_lines(s: dict) -> list[str]:
    out = []
    if "ppo_kl_second_half_mean" in s:
        out.append(f"KL held (PPO)      {s['ppo_kl_second_half_mean']:.2f} nats over the second half (target "
                   f"{s['ppo_kl_target']:g}; {100 * s['ppo_kl_second_half_within_50pct']:.0f}% of steps within +-50%)")
    if "completion_ppl_under_base_before" in s:
        out.append(f"fluency            completion perplexity under the base model "
                   f"{s['completion_ppl_under_base_before']:.1f} -> {s['completion_ppl_under_base_after']:.1f}, "
                   f"length {s['curve_length_before']:.1f} -> {s['curve_length_after']:.1f}, distinct-2 "
                   f"{s['curve_distinct_2_before']:.2f} -> {s['curve_distinct_2_after']:.2f} (curve prompts)")
    return out


def _ci_str(v: dict) -> str:
    return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
