"""Over-optimisation curve (Gao et al. 2022): proxy and gold reward of an RL run's checkpoints against their
KL to the reference.

The policy climbs the proxy reward it is trained on; a gold reward it never sees (a reward model trained on
other raters) tells whether that climb is real. Gao et al. plot both against d = sqrt(KL): the gold first
rises with the proxy, then flattens or falls while the proxy keeps rising. Every checkpoint is sampled on the
same held-out prompts with the same seed; the points are means over prompts with 95% t intervals.

Each point is one JSON line of RUN_DIR/overopt.jsonl:
    {"step": 20, "kl": {"mean", "low", "high"}, "proxy": {...}, "gold": {...}, "n_prompts": 64}
Step 0 is the reference itself (KL 0).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.config import EvalConfig
from rlhfkit.eval.evaluate import _ci, _per_prompt, sample_all, sequence_kl


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
        model = ref if path is None else load_causal_lm(str(path)).to(device).eval()
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
        kl = np.zeros(len(prompts.texts)) if path is None else _per_prompt(sequence_kl(model, ref, chunks, temp), n)
        row["kl"] = _ci(kl) if path is not None else {"mean": 0.0, "low": 0.0, "high": 0.0}
        rows.append(row)
        print(f"overopt step {step}: KL {row['kl']['mean']:.2f}, proxy {row['proxy']['mean']:.3f}, "
              f"gold {row['gold']['mean']:.3f}", flush=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def eval_config_for_curve(base: EvalConfig, n_prompts: int, samples: int) -> EvalConfig:
    """A copy of an EvalConfig sized for the curve (few prompts, few samples: it runs once per checkpoint)."""
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, max_prompts=n_prompts),
                              rollout=dataclasses.replace(base.rollout, samples_per_prompt=samples))
    return cfg
