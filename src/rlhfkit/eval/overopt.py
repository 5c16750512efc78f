"""Over-optimisation curve (Gao et al. 2022): proxy and gold reward of an RL run's checkpoints against their
KL to the reference.

The policy climbs the proxy reward it is trained on; a gold reward it never sees (a reward model trained on
other raters) tells whether that climb is real. Gao et al. plot both against d = sqrt(KL): the gold first
rises with the proxy, then flattens or falls while the proxy keeps rising. Every checkpoint is sampled on the
same held-out prompts with the same seed; the points are means over prompts with 95% t intervals.

Each point is one JSON line of RUN_DIR/overopt.jsonl:
    {"step": 20, "kl": {"mean", "low", "high"}, "proxy": {...}, "gold": {...}, "length": {...},
     "ref_ppl": 31.2, "distinct_2": 0.93, "n_prompts": 64, "samples_per_prompt": 1}
Step 0 is the reference itself (KL 0). ref_ppl (the completions' perplexity under the reference), length and
distinct-2 tell whether the policy stayed fluent on the way.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import EvalConfig
from rlhfkit.eval import metrics
from rlhfkit.eval.evaluate import _ci, _per_prompt, sample_all


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, model directory) of every checkpoint an RL run kept, oldest first."""
    from rlhfkit.utils.checkpoint import list_checkpoints

    return [(int(p.name.split("-")[1]), p / "model") for p in list_checkpoints(run_dir)]


def overopt_curve(models: list[tuple[int, str | Path]], cfg: EvalConfig, out: str | Path) -> list[dict[str, Any]]:
    """Proxy (cfg.reward) and gold (cfg.gold) reward and KL to cfg.reference of each (step, model), on
    cfg.data's prompts sampled with cfg.rollout; the reference is added as step 0. Writes `out` (JSONL)."""
    from rlhfkit.config import TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm
    from rlhfkit.models.reward import load_reward
    from rlhfkit.rl.common import load_prompts
    from rlhfkit.utils.runtime import resolve_device, seed_everything

    if not (cfg.reference and cfg.reward and cfg.gold):
        raise ValueError("the over-optimisation curve needs a reference, a proxy reward and a gold reward")
    device = resolve_device(cfg.run.device)
    tok = get_tokenizer(TokenizerConfig(), cfg.reference)
    prompts = load_prompts(cfg.data, tok)
    n, temp = cfg.rollout.samples_per_prompt, cfg.rollout.temperature or 1.0
    ref = load_causal_lm(cfg.reference).to(device).eval()
    rewards = {"proxy": load_reward(cfg.reward, device), "gold": load_reward(cfg.gold, device)}
    rows = []
    for step, path in [(0, None), *models]:
        model = ref if path is None else _load_checkpoint(Path(path), cfg.reference).to(device).eval()
        seed_everything(cfg.run.seed)  # the same dice for every checkpoint
        chunks = sample_all(model, tok, prompts.ids, prompts.texts, cfg)
        texts = [c for ro in chunks for c in ro.completions]
        comp_prompts = [p for ro in chunks for p in ro.prompts]
        row: dict[str, Any] = {"step": step, "n_prompts": len(prompts.texts), "samples_per_prompt": n}
        with torch.no_grad():
            for name, fn in rewards.items():
                scores = [s for i in range(0, len(texts), 64)
                          for s in fn(comp_prompts[i:i + 64], texts[i:i + 64]).tolist()]
                row[name] = _ci(_per_prompt(scores, n))
        kl, ref_nll, tokens = _kl_and_ref_nll(model, ref, chunks, temp)
        row["kl"] = _ci(_per_prompt(kl, n)) if path is not None else {"mean": 0.0, "low": 0.0, "high": 0.0}
        # Fluency: perplexity of the completions under the reference (a base model that gets worse at
        # predicting them means they left its language), their length and distinct-2.
        row["ref_ppl"] = math.exp(ref_nll / max(tokens, 1))
        row["length"] = _ci(_per_prompt([float(x) for ro in chunks for x in ro.lengths.tolist()], n))
        row["distinct_2"] = metrics.distinct_n(texts, 2)
        rows.append(row)
        print(f"overopt step {step}: KL {row['kl']['mean']:.2f}, proxy {row['proxy']['mean']:.3f}, "
              f"gold {row['gold']['mean']:.3f}", flush=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _load_checkpoint(path: Path, base: str) -> torch.nn.Module:
    """A checkpoint's policy: a full model, or (a LoRA run's checkpoint) adapters merged into `base`."""
    from rlhfkit.models.factory import load_causal_lm

    if not (path / "adapter_config.json").exists():
        return load_causal_lm(str(path))
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(base), str(path)).merge_and_unload()


@torch.no_grad()
def _kl_and_ref_nll(policy: torch.nn.Module, ref: torch.nn.Module, chunks: list, temperature: float
                    ) -> tuple[list[float], float, int]:
    """Per completion the k1 KL (sum of log pi - log ref over its tokens, as eval's KL); and over all
    completions the reference's summed negative log-likelihood and the token count."""
    from rlhfkit.accel import logprobs

    kl, nll, tokens = [], 0.0, 0
    for ro in chunks:
        lr, _ = logprobs(ref, ro, temperature)
        lp = lr if policy is ref else logprobs(policy, ro, temperature)[0]
        m = ro.completion_mask
        kl += ((lp - lr) * m).sum(-1).tolist()
        nll -= float((lr * m).sum())
        tokens += int(m.sum())
    return kl, nll, tokens


def eval_config_for_curve(base: EvalConfig, n_prompts: int, samples: int) -> EvalConfig:
    """A copy of an EvalConfig sized for the curve (few prompts, few samples: it runs once per checkpoint)."""
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, max_prompts=n_prompts),
                              rollout=dataclasses.replace(base.rollout, samples_per_prompt=samples))
    return cfg
