"""Supervised fine-tuning on prompt/response pairs: `rlhfkit sft`.

The loss covers the response tokens (and the closing EOS) only; prompt tokens are context. Works for any
HF causal LM: the tiny model from `rlhfkit pretrain`, or a real one such as SmolLM2.

Departure from the usual mean-per-micro-batch loss, and why: each micro-batch's token-loss *sum* is
divided by the number of response tokens in the whole global batch (all micro-batches, all processes).
With variable-length responses this makes the gradient the same whatever the split into micro-batches
and processes (batch 1 x accum 8 == batch 8 x accum 1), which a mean of per-micro-batch means is not.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlhfkit.config import SFTConfig
from rlhfkit.data.datasets import EpochSampler, collate_sft, encode_pair
from rlhfkit.data.sources import load_pairs
from rlhfkit.errors import DataError
from rlhfkit.models.factory import build_model, count_params, get_tokenizer
from rlhfkit.train import driver
from rlhfkit.train.pretrain import sample_texts
from rlhfkit.utils.distributed import Dist
from rlhfkit.utils.logging import MetricLogger  # noqa: F401  (tests hook MetricLogger.log here)
from rlhfkit.utils.runtime import seed_everything


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the response positions of a micro-batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    per_tok = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    return (per_tok * batch["loss_mask"].flatten()).sum()


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list, bs: int, pad_id: int, dist: Dist) -> float:
    model.eval()
    total, count = 0.0, 0.0
    mine = examples[dist.rank::dist.world]
    for i in range(0, len(mine), bs):
        batch = {k: v.to(dist.device) for k, v in collate_sft(mine[i:i + bs], pad_id).items()}
        total += float(token_loss_sum(model, batch))
        count += float(batch["loss_mask"].sum())
    model.train()
    return dist.sum(total) / max(dist.sum(count), 1.0)


def train(cfg: SFTConfig) -> dict[str, Any]:
    run = driver.setup("sft", cfg, cfg.run.precision)
    dist = run.dist

    # Data: pairs -> (ids, n_prompt_tokens), split by pair with a fixed seed.
    tok = get_tokenizer(cfg.tokenizer, cfg.model.name_or_path)
    pairs = load_pairs(cfg.data.source, cfg.data.prompt_field, cfg.data.response_field, cfg.data.max_examples)
    if cfg.data.template == "chat" and not getattr(tok, "chat_template", None):
        raise DataError(f"data.template=chat but the tokenizer of {cfg.model.name_or_path} has no chat "
                        "template; use data.template=plain")
    encoded = [encode_pair(tok, p["prompt"], p["response"], cfg.data.template, cfg.data.max_len) for p in pairs]
    order = np.random.default_rng(cfg.run.seed).permutation(len(encoded))
    n_val = max(1, round(cfg.data.val_fraction * len(encoded)))
    val = [encoded[i] for i in order[:n_val]][:cfg.eval_examples or None]
    train_set = [encoded[i] for i in order[n_val:]]
    sampler = EpochSampler(len(train_set), cfg.run.seed)

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, tok).to(dist.device)
    n_params = count_params(model)
    bs, global_bs = cfg.optim.batch_size, run.global_bs
    n_resp = sum(len(x) - n for x, n in train_set)
    header = (f"{n_params / 1e6:.2f}M params, {len(train_set)} train / {len(val)} val pairs ({n_resp} "
              f"response tokens per epoch), global batch {global_bs}")
    # final/ is the best validation model; MFU counted at half the longest sequence.
    model = run.start(model, tok, header, select="loss/val", seq_len=cfg.data.max_len // 2)

    def step() -> driver.Step:
        # The global batch at pos; normalise by its total response tokens (see module docstring).
        examples = [train_set[i] for _, i in sampler.indices(run.pos, global_bs)]
        n_target = sum(len(x) - max(n, 1) for x, n in examples)  # = loss_mask.sum() of the batch
        step_loss = 0.0
        for mb in run.micro_batches(examples[dist.shard(global_bs)]):
            batch = {key: v.to(dist.device) for key, v in collate_sft(mb, tok.pad_token_id).items()}
            # DDP averages gradients over ranks, so scale by world to get the global sum / n.
            loss = token_loss_sum(model, batch) * dist.world / n_target
            dist.backward(loss)
            step_loss += loss.item() / dist.world
        return driver.Step(dist.sum(step_loss), tokens=sum(len(x) for x, _ in examples))

    def validate() -> dict[str, float]:
        val_loss = evaluate(model, val, bs, tok.pad_token_id, dist)
        return {"loss/val": val_loss, "ppl/val": math.exp(min(val_loss, 50))}

    def samples(step: int) -> None:
        prompts = [_as_prompt(tok, p, cfg.data.template) for p in cfg.sample_prompts]
        chat = cfg.data.template == "chat"  # the rendered template has its own markers, no BOS
        outs = sample_texts(dist.unwrap(model), tok, prompts, add_special_tokens=not chat)
        for p, s in zip(cfg.sample_prompts, outs):
            run.logger.log_text(f"sample/{p}", s, step)
            run.logger.write(f"  {p!r} -> {s!r}")

    run.train(step, len(train_set), evaluate=validate, samples=samples)
    best = run.best_val
    return run.finish({"params": n_params, "train_pairs": len(train_set), "val_pairs": len(val),
                       "best_val_loss": best, "val_ppl": math.exp(best) if best is not None else None},
                      f"best val loss {best if best is not None else math.inf:.4f}")


def _as_prompt(tok: Any, prompt: str, template: str) -> str:
    """The text the model sees before its answer, as in training (chat template or plain)."""
    if template == "chat":
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
    return prompt
