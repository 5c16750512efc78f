"""DPO / IPO on offline preference pairs: `rlhfkit dpo` (Rafailov et al. 2023; Azar et al. 2023).

Input: the pairs export of the feedback store (JSONL: prompt, chosen, rejected; docs/formats.md). Each pair
becomes two sequences, prompt + completion + EOS, and the loss (rl/losses.py dpo_loss) compares how much
more the policy than the frozen reference (the starting model) prefers the chosen completion:
h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], log-probabilities summed over the
completion tokens and EOS.

Departures from the usual recipe, and why:
  * the reference log-probabilities of every pair are computed once, before training, and the reference
    model is then freed: it is frozen, so this is exact and halves the forward passes (and the memory) of
    every later step;
  * chosen and rejected of a micro-batch go through the policy in one forward pass (one padded batch);
  * the loss is a mean over the pairs of the global batch however it is split into micro-batches and
    processes (each micro-batch's sum is divided by the global batch size).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlhfkit.accel import select as select_accel
from rlhfkit.config import DPOConfig
from rlhfkit.data.datasets import EpochSampler, collate_sft, encode_pair
from rlhfkit.data.sources import read_jsonl_records
from rlhfkit.errors import DataError
from rlhfkit.models.factory import build_model, count_params, get_tokenizer
from rlhfkit.models.ops import gather_logprobs
from rlhfkit.rl.losses import dpo_loss
from rlhfkit.train import driver
from rlhfkit.utils.runtime import seed_everything

Pair = tuple[tuple[list[int], int], tuple[list[int], int]]  # ((ids, n_prompt) chosen, (ids, n_prompt) rejected)


def load_pairs(cfg: DPOConfig, tok: Any) -> list[Pair]:
    d = cfg.data
    recs = read_jsonl_records(d.source, (d.prompt_field, d.chosen_field, d.rejected_field))
    if d.max_pairs:
        recs = recs[:d.max_pairs]
    pairs = []
    for r in recs:
        if r.get("tie"):
            continue  # a tie says nothing about which to prefer
        pairs.append((encode_pair(tok, r[d.prompt_field], r[d.chosen_field], d.template, d.max_len),
                      encode_pair(tok, r[d.prompt_field], r[d.rejected_field], d.template, d.max_len)))
    if not pairs:
        raise DataError(f"{d.source}: no usable preference pairs (all ties?)")
    return pairs


def completion_logps(model: torch.nn.Module, pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected completions: (b,), (b,)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_sft([c for c, _ in pairs] + [r for _, r in pairs], pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2b, T, V)
    logps = (gather_logprobs(logits, batch["labels"]) * batch["loss_mask"]).sum(-1)  # (2b,)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list[Pair], bs: int, pad_id: int) -> torch.Tensor:
    """(n, 2): reference log-probabilities of (chosen, rejected) for every pair."""
    model.eval()
    out = [torch.stack(completion_logps(model, pairs[i:i + bs], pad_id), 1).cpu() for i in range(0, len(pairs), bs)]
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, pairs, ref, cfg, pad_id) -> dict[str, float]:
    model.eval()
    stats = {"accuracy": 0.0, "margin": 0.0}
    bs = cfg.optim.batch_size
    for i in range(0, len(pairs), bs):
        c, r = completion_logps(model, pairs[i:i + bs], pad_id)
        ref_b = ref[i:i + bs].to(c.device)
        _, st = dpo_loss(c, r, ref_b[:, 0], ref_b[:, 1], cfg.beta, cfg.loss, cfg.label_smoothing)
        for k in stats:
            stats[k] += float(st[k]) * len(c) / len(pairs)
    model.train()
    return {f"eval/{k}": v for k, v in stats.items()}


def train(cfg: DPOConfig) -> dict[str, Any]:
    run = driver.setup("dpo", cfg)
    dist = run.dist
    accel = select_accel(cfg)  # our log-prob kernels, or torch's ops (run.accel=off)

    tok = get_tokenizer(cfg.tokenizer, cfg.model.name_or_path)
    pairs = load_pairs(cfg, tok)
    order = np.random.default_rng(cfg.run.seed).permutation(len(pairs))
    n_val = round(cfg.data.val_fraction * len(pairs)) if len(pairs) > 1 else 0
    val = [pairs[i] for i in order[:n_val]]
    train_set = [pairs[i] for i in order[n_val:]]
    sampler = EpochSampler(len(train_set), cfg.run.seed)

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, tok).to(dist.device)
    # Reference log-probs of every pair, from the starting model (not a resumed checkpoint's), once (see
    # module docstring): (n, 2).
    bs, global_bs, pad = cfg.optim.batch_size, run.global_bs, tok.pad_token_id
    ref_train = reference_logps(model, train_set, bs, pad)
    ref_val = reference_logps(model, val, bs, pad) if val else None
    model.train()
    header = (f"{count_params(model) / 1e6:.2f}M params, {len(train_set)} train / {len(val)} val pairs, "
              f"global batch {global_bs} pairs, loss {cfg.loss}, beta {cfg.beta}; {accel.header()}")
    model = run.start(model, tok, header)  # final/ is the last model

    def step() -> driver.Step:
        idx = [i for _, i in sampler.indices(run.pos, global_bs)][dist.shard(global_bs)]
        sums = {"loss": 0.0, "margin": 0.0, "accuracy": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0}
        for mb in run.micro_batches(idx):
            c, r = completion_logps(model, [train_set[i] for i in mb], pad)  # (b,), (b,)
            ref_b = ref_train[mb].to(c.device)
            loss, st = dpo_loss(c, r, ref_b[:, 0], ref_b[:, 1], cfg.beta, cfg.loss, cfg.label_smoothing)
            # Mean over the global batch: this micro-batch's share (DDP averages over ranks).
            dist.backward(loss * len(mb) * dist.world / global_bs)
            w = len(mb) / (bs * cfg.optim.grad_accum)
            sums["loss"] += float(loss.detach()) * w
            for key in ("margin", "accuracy", "reward_chosen", "reward_rejected"):
                sums[key] += float(st[key]) * w
        return driver.Step(dist.mean(sums.pop("loss")), {f"dpo/{k}": dist.mean(v) for k, v in sums.items()})

    def validate() -> dict[str, float]:
        # One process evaluates, on the whole validation set; the others go on.
        return evaluate(dist.unwrap(model), val, ref_val, cfg, pad) if dist.is_main else {}

    run.train(step, len(train_set), evaluate=validate if val else None)
    final_eval = validate() if val else {}  # of the last model, the one saved
    return run.finish({"train_pairs": len(train_set), "val_pairs": len(val), **final_eval})
