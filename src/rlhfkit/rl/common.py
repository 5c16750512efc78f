"""Orchestration shared by the RL loops (prompts, models, guards, logging helpers). No numerics here:
those live in rl/losses.py, rl/advantages.py and models/ops.py."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import ConfigError, DataError, TrainingError
from rlhfkit.utils.checkpoint import latest_checkpoint


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    ids: list[list[int]]  # token ids as the policy sees them (BOS / chat template included)
    texts: list[str]      # what the reward function is given as the prompt


def _prompt_texts(dcfg: Any, tok: Any) -> list[str]:
    from rlhfkit.data.sources import _is_file_spec, load_texts, read_jsonl_records

    spec = dcfg.source
    if spec.endswith(".txt"):
        return load_texts(spec)
    if spec.endswith(".json"):
        p = Path(spec)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: cannot read prompts ({e})") from None
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
    if spec.endswith((".jsonl", ".json")):
        return [r[dcfg.prompt_field] for r in read_jsonl_records(spec, (dcfg.prompt_field,))]
    if _is_file_spec(spec):
        raise DataError(f"{spec}: prompts must be a .txt, .jsonl or .json file")
    # A named text source: each document's first prompt_tokens tokens make a prompt.
    out = []
    for doc in load_texts(spec):
        ids = tok(doc, add_special_tokens=False)["input_ids"][:dcfg.prompt_tokens]
        if ids:
            out.append(tok.decode(ids))
    return out


def load_prompts(dcfg: Any, tok: Any) -> PromptSet:
    """Prompts of a PromptDataConfig, tokenized once (long ones keep their last max_prompt_tokens)."""
    texts = [t for t in _prompt_texts(dcfg, tok) if t.strip()]
    if dcfg.max_prompts:
        texts = texts[:dcfg.max_prompts]
    if not texts:
        raise DataError(f"{dcfg.source}: no prompts")
    if dcfg.template == "chat":
        if not getattr(tok, "chat_template", None):
            raise ConfigError("data.template=chat but the tokenizer has no chat template; use plain")
        ids = []
        for t in texts:
            x = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
            ids.append(list(x["input_ids"] if hasattr(x, "keys") else x))
    else:
        ids = [list(x) for x in tok(texts, add_special_tokens=True)["input_ids"]]
    return PromptSet([x[-dcfg.max_prompt_tokens:] for x in ids], texts)


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def use_fast_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's Python tanh-GELU (six elementwise kernels, each output kept for backward) for torch's
    fused F.gelu(approximate='tanh'): the same function, equal to float rounding (~1e-6), one kernel
    forward and one backward. The saved config is unchanged."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is NewGELUActivation:
                setattr(mod, child_name, GELUTanh())
    return model


def load_policy(path: str, dtype: str, device: torch.device, trainable: bool = True) -> torch.nn.Module:
    from rlhfkit.models.factory import load_causal_lm

    model = use_fast_activations(load_causal_lm(path, dtype)).to(device)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


def check_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the RL stages run in one process (one GPU or the CPU); multi-process RL is not "
                          "supported yet")


# ---------------------------------------------------------------------------------------------------
# Guards and logging helpers
# ---------------------------------------------------------------------------------------------------
def check_finite(what: str, value: torch.Tensor | float, step: int, run_dir: Path) -> None:
    """Stop the run, without updating anything, if a loss or reward is NaN/inf; name the last good checkpoint."""
    t = torch.as_tensor(value)
    if bool(torch.isfinite(t).all()):
        return
    bad = t[~torch.isfinite(t)].flatten()[0].item() if t.dim() else t.item()
    last = latest_checkpoint(run_dir)
    where = (f"the last good checkpoint is {last} (a rerun with the same run_dir resumes from it)" if last
             else "no checkpoint was written yet")
    n = int((~torch.isfinite(t)).sum()) if t.dim() else 1
    raise TrainingError(f"{what} is {bad} ({n} value(s)) at step {step}; stopped before updating the model; "
                        f"{where}. Check the reward function, or lower optim.lr")


def samples_table(prompts: list[str], completions: list[str], rewards: torch.Tensor, k: int = 8) -> str:
    """A markdown table of the first k samples (prompt, completion, reward) for the logs."""
    def cell(s: str) -> str:
        s = s.replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= 120 else s[:117] + "..."

    rows = ["| prompt | completion | reward |", "|---|---|---|"]
    for p, c, r in list(zip(prompts, completions, rewards.tolist()))[:k]:
        rows.append(f"| {cell(p)} | {cell(c)} | {r:.4g} |")
    return "\n".join(rows)


def micro_batches(n: int, size: int, group: int = 1) -> list[slice]:
    """Row slices of at most `size` rows, each a whole number of groups (so prompts can be shared)."""
    size = max(group, size - size % group) if group > 1 else max(1, size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
