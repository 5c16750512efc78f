"""`rlhfkit eval`: how a policy compares with its reference on held-out prompts.

For every prompt, n completions are sampled from the policy (and from the reference). Scores are averaged
per prompt first, so the 95% intervals are over prompts (the unit that was held out), not over samples:

  proxy reward   the reward the policy was trained on (it can be gamed: Goodhart)
  gold reward    a reward it never saw, e.g. a reward model trained on other raters (Gao et al. 2022)
  judge          the VADER lexicon's sentiment of the completion alone (an instrument nobody trained on)
  KL             sum over completion tokens of log pi(y_t) - log ref(y_t) on the policy's samples (the k1
                 estimate of KL(pi || ref) per completion, in nats)
  win rate       share of prompts whose judge score went up (ties half)
  distinct-n, length, and perplexity on held-out text (has RL hurt the language model?)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.config import EvalConfig
from rlhfkit.eval import metrics
from rlhfkit.eval.judges import POSITIVE_THRESHOLD, vader_compound


def _ci(x: list[float] | np.ndarray) -> dict[str, float]:
    m, lo, hi = metrics.mean_ci(list(map(float, x)))
    return {"mean": m, "low": lo, "high": hi}


def _per_prompt(values: list[float], n: int) -> np.ndarray:
    """Mean over each prompt's n consecutive samples: (P*n,) -> (P,)."""
    return np.asarray(values, dtype=np.float64).reshape(-1, n).mean(1)


@torch.no_grad()
def sample_all(model: torch.nn.Module, tok: Any, prompt_ids: list[list[int]], texts: list[str], cfg: EvalConfig):
    """Rollouts for every prompt in batches; returns a list of Rollout chunks."""
    from rlhfkit.rl.rollout import SamplingParams, generate

    sp = SamplingParams.from_config(cfg.rollout)
    bs = cfg.rollout.prompts_per_step
    return [generate(model, tok, prompt_ids[i:i + bs], sp, cfg.rollout.samples_per_prompt,
                     backend=cfg.rollout.backend, prompts=texts[i:i + bs]) for i in range(0, len(texts), bs)]


@torch.no_grad()
def sequence_kl(policy: torch.nn.Module, ref: torch.nn.Module, chunks: list, temperature: float) -> list[float]:
    """Per completion: sum_t log pi(y_t | ...) - log ref(y_t | ...), on the policy's own samples."""
    from rlhfkit.accel import logprobs  # our forward where it takes the model, else HF's

    out: list[float] = []
    for ro in chunks:
        lp, _ = logprobs(policy, ro, temperature)
        lr, _ = logprobs(ref, ro, temperature)
        out += ((lp - lr) * ro.completion_mask).sum(-1).tolist()
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, tok: Any, texts: list[str], device: torch.device, max_len: int = 256) -> float:
    """exp(mean token NLL) of the texts (each with BOS, truncated to max_len tokens)."""
    from rlhfkit.models.ops import causal_lm_loss

    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t, add_special_tokens=True)["input_ids"][:max_len]], device=device)
        if ids.size(1) < 2:
            continue
        loss, n = causal_lm_loss(model(input_ids=ids[:, :-1]).logits, ids[:, 1:])
        total += float(loss) * int(n)
        count += int(n)
    return math.exp(total / max(count, 1))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from rlhfkit.config import TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm
    from rlhfkit.models.reward import load_reward
    from rlhfkit.rl.common import load_prompts
    from rlhfkit.utils.runtime import quiet_hf, resolve_device, seed_everything, set_threads

    t0 = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    device = resolve_device(cfg.run.device)
    tok = get_tokenizer(TokenizerConfig(), cfg.policy)
    if cfg.env.name:
        return evaluate_in_env(cfg, tok, device, t0)
    prompts = load_prompts(cfg.data, tok)
    n = cfg.rollout.samples_per_prompt
    models = {"after": load_causal_lm(cfg.policy).to(device).eval()}
    if cfg.reference:
        models["before"] = load_causal_lm(cfg.reference).to(device).eval()
    rewards = {k: load_reward(spec, device) for k, spec in (("proxy", cfg.reward), ("gold", cfg.gold)) if spec}

    result: dict[str, Any] = {"policy": cfg.policy, "reference": cfg.reference or None,
                              "n_prompts": len(prompts.texts), "samples_per_prompt": n,
                              "proxy": cfg.reward or None, "gold": cfg.gold or None,
                              "judge": None if cfg.judge == "none" else "vader (compound of the completion, "
                              f"positive if >= {POSITIVE_THRESHOLD})"}
    chunks: dict[str, list] = {}
    per_prompt: dict[str, dict[str, np.ndarray]] = {}
    completions: dict[str, list[str]] = {}
    for side, model in models.items():
        # Same seed for both sides: the difference between them is the model, not the dice.
        seed_everything(cfg.run.seed)
        chunks[side] = sample_all(model, tok, prompts.ids, prompts.texts, cfg)
        texts = [c for ro in chunks[side] for c in ro.completions]
        comp_prompts = [p for ro in chunks[side] for p in ro.prompts]
        lengths = [int(x) for ro in chunks[side] for x in ro.lengths.tolist()]
        completions[side] = texts
        pp: dict[str, np.ndarray] = {"length": _per_prompt(lengths, n)}
        for name, fn in rewards.items():
            scores = []
            for i in range(0, len(texts), 64):
                scores += fn(comp_prompts[i:i + 64], texts[i:i + 64]).tolist()
            pp[f"{name}_reward"] = _per_prompt(scores, n)
        if cfg.judge == "vader":
            comp = vader_compound(texts)
            pp["judge_compound"] = _per_prompt(comp, n)
            pp["judge_positive_rate"] = _per_prompt([float(c >= POSITIVE_THRESHOLD) for c in comp], n)
        per_prompt[side] = pp
        for key, vals in pp.items():
            result[f"{key}_{side}"] = _ci(vals)
        result[f"distinct_1_{side}"] = metrics.distinct_n(texts, 1)
        result[f"distinct_2_{side}"] = metrics.distinct_n(texts, 2)
        if cfg.ppl_source:
            from rlhfkit.data.sources import load_texts

            docs = load_texts(cfg.ppl_source, max_docs=cfg.ppl_docs)
            result[f"ppl_{side}"] = perplexity(model, tok, docs, device)

    if "before" in models:
        kl = _per_prompt(sequence_kl(models["after"], models["before"], chunks["after"],
                                     cfg.rollout.temperature or 1.0), n)
        result["kl_mean"] = _ci(kl)
        for key in per_prompt["after"]:
            d, lo, hi = metrics.paired_bootstrap_diff(per_prompt["before"][key], per_prompt["after"][key])
            result[f"{key}_change"] = {"mean": d, "low": lo, "high": hi}
        if cfg.judge == "vader":
            w, lo, hi = metrics.win_rate(per_prompt["before"]["judge_compound"],
                                         per_prompt["after"]["judge_compound"])
            result["win_rate_vs_reference"] = {"mean": w, "low": lo, "high": hi}

    keep = min(cfg.samples_in_report, len(prompts.texts))
    rows = []
    for i in range(keep):
        row: dict[str, Any] = {"prompt": prompts.texts[i], "after": completions["after"][i * n]}
        if "before" in completions:
            row["before"] = completions["before"][i * n]
        rows.append(row)
    result["samples"] = rows
    result["wall_s"] = round(time.time() - t0, 1)

    out = Path(cfg.out) if cfg.out else Path(cfg.policy).resolve().parent / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    _print(result, out)
    return result


def evaluate_in_env(cfg: EvalConfig, tok: Any, device: torch.device, t0: float) -> dict[str, Any]:
    """eval.json for an environment: success rate, return and pass@k of policy (after) and reference
    (before) on the same held-out episodes (rlhfkit.envs.evaluate)."""
    from rlhfkit.envs.evaluate import evaluate_env
    from rlhfkit.models.factory import load_causal_lm
    from rlhfkit.rl.rollout import SamplingParams

    sides = {"after": cfg.policy, **({"before": cfg.reference} if cfg.reference else {})}
    n = cfg.rollout.samples_per_prompt
    result: dict[str, Any] = {"policy": cfg.policy, "reference": cfg.reference or None, "env": cfg.env.name}
    samples: dict[str, list] = {}
    for side, path in sides.items():
        model = load_causal_lm(path).to(device).eval()
        r = evaluate_env(model, tok, cfg.env, cfg.env_problems, n, list(cfg.pass_k),
                         SamplingParams.from_config(cfg.rollout), cfg.data.template, cfg.rollout.backend,
                         cfg.run.seed, cfg.rollout.prompts_per_step)
        result.update({"n_prompts": r["problems"], "samples_per_prompt": n, "env_kwargs": r["env_kwargs"],
                       f"env_errors_{side}": r["errors"]})
        for key, val in r["metrics"].items():
            result[f"{key}_{side}"] = val
        samples[side] = r["samples"]
        del model
    keep = min(cfg.samples_in_report, len(samples["after"]))
    result["samples"] = [{"prompt": samples["after"][i]["prompt"], "after": samples["after"][i]["episode"],
                          **({"before": samples["before"][i]["episode"]} if "before" in samples else {})}
                         for i in range(keep)]
    result["wall_s"] = round(time.time() - t0, 1)
    out = Path(cfg.out) if cfg.out else Path(cfg.policy).resolve().parent / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    _print(result, out)
    return result


def _print(r: dict, out: Path) -> None:
    keys = sorted({k.rsplit("_", 1)[0] for k in r if k.endswith("_after") and isinstance(r[k], dict)})
    print(f"eval of {r['policy']} on {r['n_prompts']} held-out prompts x {r['samples_per_prompt']} samples:")
    for k in keys:
        a = r[f"{k}_after"]
        line = f"  {k:<22} after {a['mean']:.4g} [{a['low']:.4g}, {a['high']:.4g}]"
        if f"{k}_before" in r:
            b = r[f"{k}_before"]
            line = (f"  {k:<22} before {b['mean']:.4g} [{b['low']:.4g}, {b['high']:.4g}]  ->  "
                    f"after {a['mean']:.4g} [{a['low']:.4g}, {a['high']:.4g}]")
        print(line)
    if "kl_mean" in r:
        k = r["kl_mean"]
        print(f"  {'kl_to_reference':<22} {k['mean']:.4g} [{k['low']:.4g}, {k['high']:.4g}] nats per completion")
    print(f"written to {out}")
