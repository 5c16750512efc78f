"""Orchestration shared by the RL loops (prompts, models, processes, guards, logging helpers). No numerics
here: those live in rl/losses.py, rl/advantages.py and models/ops.py.

Several processes (torchrun / accelerate launch): the rollout batch of U prompts x G samples is split by
prompt, each rank sampling, scoring and training on U / world whole groups (global rows rank * B / world
...). The random numbers a completion is sampled with depend only on (seed, step, global row)
(`step_uniforms`), so the samples do not depend on the world size. Anything computed over the batch
(advantage whitening and baselines, token counts that normalise the loss, KL-controller updates, logged
statistics) is computed on the global batch: every rank gathers the per-row numbers it needs
(Dist.gather_rows), runs the same pure function on them and keeps its rows. Each rank's loss is normalised
by those global counts and the gradients are summed over ranks (Dist.sum_gradients) before clipping, so
the update is the one a single process makes on the whole batch. We sum gradients ourselves rather than
wrapping the policy in DDP: a training forward runs the model twice per backward (prompt once per group,
then the completions, rollout.completion_logprobs), a rank may own no rows of a PPO mini-batch, and the
sampler reads the bare model; DDP's reducer wants one forward per backward on every rank.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import ConfigError, DataError, TrainingError
from rlhfkit.utils.checkpoint import latest_checkpoint, save_model


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
def load_policy(path: str, dtype: str, device: torch.device, trainable: bool = True,
                fast: bool = True) -> torch.nn.Module:
    """A causal LM for an RL loop; `fast`: with our GELU modules (the accelerated path's)."""
    from rlhfkit.models.factory import load_causal_lm

    model = load_causal_lm(path, dtype)
    if fast:
        from rlhfkit.accel.activations import use_fast_activations

        model = use_fast_activations(model)
    model = model.to(device)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


def policy_and_reference(mcfg: Any, kl_coef: float, device: torch.device, acc: Any = None
                         ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trainable policy (with LoRA adapters if model.lora_r > 0, gradient checkpointing if asked) and
    the frozen reference it is penalised against, with a prompt cache of up to acc.ref_cache_mb
    (fastdecode.PromptCache; `acc`: the run's accel.Accel; None: our modules, no cache). With LoRA the reference is the policy itself with its adapters disabled
    (`reference_logprobs`): the frozen base weights are shared, not copied, and there is no cache."""
    from rlhfkit.models.factory import apply_lora, enable_gradient_checkpointing
    fast = acc is None or acc.fast_decode
    policy = load_policy(mcfg.name_or_path, mcfg.dtype, device, fast=fast)
    if mcfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if mcfg.lora_r:
        policy = apply_lora(policy, mcfg).train()
        return policy, None
    ref = load_policy(mcfg.name_or_path, mcfg.dtype, device, trainable=False, fast=fast) if kl_coef else None
    if ref is not None and acc is not None and acc.ref_cache_mb:
        from rlhfkit.accel.fastdecode import cache_prompts

        cache_prompts(ref, acc.ref_cache_mb)
    return policy, ref


def reference_logprobs(policy: torch.nn.Module, ref: torch.nn.Module | None, ro: Any, temperature: float,
                       batch_size: int, logprobs: Any = None) -> torch.Tensor:
    """Log-probs (B, C) of the rollout's completions under the reference: the reference model, or (LoRA) the
    policy with its adapters switched off. No gradients. `logprobs`: how to compute them (the run's
    Accel.logprobs; default: the accelerated parts wherever they apply)."""
    from rlhfkit.utils.checkpoint import is_peft

    if logprobs is None:
        from rlhfkit.accel import logprobs

    model, off = ref if ref is not None else policy, contextlib.nullcontext()
    if ref is None and is_peft(policy):
        # Adapters off, the base model's own forward is the reference: a plain model (its adapted layers
        # hand back their base weights), so the accelerated forward applies to it as to a full reference.
        model, off = policy.get_base_model(), policy.disable_adapter()
    B, G = len(ro.prompts), ro.group_size
    with torch.no_grad(), off:
        return torch.cat([logprobs(model, ro.rows(mb), temperature)[0]
                          for mb in micro_batches(B, batch_size, G)])


# ---------------------------------------------------------------------------------------------------
# Processes (see the module docstring)
# ---------------------------------------------------------------------------------------------------
def rl_dist(cfg: Any) -> tuple[Any, Any]:
    """The Dist of an RL stage (the step's prompts must split evenly over the processes) and the run's
    accelerated path (accel.Accel, from run.accel), with the CPU allocator it asks for in place."""
    from rlhfkit import accel
    from rlhfkit.accel import cpu_alloc
    from rlhfkit.utils.distributed import Dist

    dist = Dist(cfg.run.device)
    U = cfg.rollout.prompts_per_step
    if U % dist.world:
        raise ConfigError(f"rollout.prompts_per_step={U} does not split over {dist.world} processes (each "
                          "process samples whole groups of the same number of prompts)")
    acc = accel.select(cfg)
    dist.cpu_allocator = cpu_alloc.use(acc.allocator, dist.device)
    return dist, acc


def run_note(dist: Any, acc: Any) -> str:
    """The run header's word on the accelerated path and run.cpu_allocator (CPU runs only)."""
    note = f"; {acc.header()}"
    if dist.device.type != "cpu":
        return note
    from rlhfkit.accel.cpu_alloc import NOT_IN_USE

    status = getattr(dist, "cpu_allocator", "")
    if status.startswith("on"):
        return note + "; CPU allocator: ours (caching)"
    return note + "; CPU allocator: torch's" + ("" if status == NOT_IN_USE else f" (ours is {status})")


def step_uniforms(seed: int, step: int, n_rows: int, n_tokens: int) -> torch.Tensor:
    """The sampling randomness of one RL step: (n_rows, n_tokens) uniforms for the whole global batch from a
    generator seeded by (seed, step); a rank takes its rows. Step-seeded, so a resumed run samples what an
    uninterrupted one would, on any number of processes."""
    import numpy as np

    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return torch.rand(n_rows, n_tokens, generator=g)


def global_rows(dist: Any, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's rows from every rank, in global order (see Dist.gather_rows)."""
    return [dist.gather_rows(x) for x in xs]


def mine(dist: Any, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """This rank's rows of a global-batch tensor (and its first `width` columns, undoing gather padding)."""
    out = x[dist.shard(x.size(0))]
    return out if width is None else out[:, :width]


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


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_(params, max_norm), then optimizer.step(); returns the gradient's norm
    before clipping. (The accelerated path's Accel.clip_and_step makes the same update with less work.)"""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return float(norm)


def micro_batches(n: int, size: int, group: int = 1) -> list[slice]:
    """Row slices of at most `size` rows, each a whole number of groups (so prompts can be shared)."""
    size = max(group, size - size % group) if group > 1 else max(1, size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def finish_run(dist: Any, run_dir: Path, policy: torch.nn.Module, tok: Any, logger: Any, step: int,
               history: list[float], kl_coef: float, t_start: float, save_more: Any = None, **extra: Any) -> dict:
    """The end of every RL loop: rank 0 saves final/ (LoRA: adapters merged into a plain HF model), anything
    else the loop keeps (`save_more()`, e.g. PPO's critic), summary.json and a closing line; every rank
    waits for it. Returns the summary (`extra` keys go into it)."""
    final = run_dir / "final"
    summary = {"steps": step, "reward_first": history[0] if history else None,
               "reward_last": history[-1] if history else None, "kl_coef": kl_coef,
               "final_model": str(final), **extra, "wall_s": round(time.time() - t_start, 1)}
    if dist.is_main:
        save_model(final, policy, tok)
        if save_more is not None:
            save_more()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        logger.write(f"done: {step} steps, reward {summary['reward_first']} -> {summary['reward_last']}; "
                     f"policy in {final}")
    dist.barrier()
    return summary
