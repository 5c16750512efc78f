"""Supervised fine-tuning on prompt/response pairs: `rlhfkit sft`.

The loss covers the response tokens (and the closing EOS) only; prompt tokens are context. Works for any
HF causal LM: the tiny model from `rlhfkit pretrain`, or a real one such as SmolLM2.

Departure from the usual mean-per-micro-batch loss, and why: each micro-batch's token-loss *sum* is
divided by the number of response tokens in the whole global batch (all micro-batches, all processes).
With variable-length responses this makes the gradient the same whatever the split into micro-batches
and processes (batch 1 x accum 8 == batch 8 x accum 1), which a mean of per-micro-batch means is not.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlhfkit.config import SFTConfig
from rlhfkit.data.datasets import EpochSampler, collate_sft, encode_pair
from rlhfkit.data.sources import load_pairs
from rlhfkit.errors import DataError, TrainingError
from rlhfkit.models.factory import build_model, count_params, get_tokenizer, lr_lambda, make_optimizer
from rlhfkit.train.pretrain import sample_texts
from rlhfkit.utils.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights_into,
    save_checkpoint,
    save_model,
)
from rlhfkit.utils.distributed import Dist
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (
    GracefulStop,
    Throughput,
    default_run_dir,
    model_flops_per_token,
    peak_flops,
    quiet_hf,
    seed_everything,
    set_threads,
    write_run_config,
)


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
    t_start = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    dist = Dist(cfg.run.device, cfg.run.precision)
    run_dir = default_run_dir("sft", cfg.log.run_dir)
    if dist.is_main:
        write_run_config(run_dir, cfg)
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None

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
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim))
    step, pos, best_val, tokens_seen = 0, 0, math.inf, 0
    if ckpt is not None:
        load_weights_into(model, ckpt / "model")
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, pos, best_val, tokens_seen = state["step"], state["pos"], state["best_val"], state["tokens_seen"]
    model, optimizer = dist.prepare(model, optimizer)
    model.train()

    bs, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    global_bs = bs * accum * dist.world
    mcfg = dist.unwrap(model).config
    flops_tok = model_flops_per_token(n_params, mcfg.num_hidden_layers, mcfg.hidden_size, cfg.data.max_len // 2,
                                      frozen=count_params(model, frozen_only=True))
    meter = Throughput(flops_tok, peak_flops(dist.device))
    logger = MetricLogger(run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=step, desc="sft",
                          is_main=dist.is_main)
    n_resp = sum(len(x) - n for x, n in train_set)
    logger.write(f"sft: {n_params / 1e6:.2f}M params, {len(train_set)} train / {len(val)} val pairs "
                 f"({n_resp} response tokens per epoch), global batch {global_bs}, {dist.world} process(es)"
                 + (f"; resumed from {ckpt} at step {step}" if ckpt else ""))

    saved_step = step

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if dist.is_main:
            save_checkpoint(run_dir, step, models={"model": dist.unwrap(model)}, tokenizer=tok,
                            keep=cfg.log.keep_checkpoints,
                            state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "pos": pos, "best_val": best_val, "tokens_seen": tokens_seen})
        dist.barrier()

    with GracefulStop() as stop, logger:
        while step < cfg.optim.max_steps:
            # The step's global batch; normalise by its total response tokens (see module docstring).
            examples = [train_set[i] for _, i in sampler.indices(pos, global_bs)]
            n_target = sum(len(x) - max(n, 1) for x, n in examples)  # = loss_mask.sum() of the batch
            mine = examples[dist.shard(global_bs)]
            step_loss = 0.0
            for k in range(accum):
                batch = {key: v.to(dist.device) for key, v in collate_sft(mine[k * bs:(k + 1) * bs],
                                                                             tok.pad_token_id).items()}
                with dist.no_sync(model, sync=(k == accum - 1)):
                    # DDP averages gradients over ranks, so scale by world to get the global sum / n.
                    loss = token_loss_sum(model, batch) * dist.world / n_target
                    dist.backward(loss)
                step_loss += loss.item() / dist.world
            step_loss = dist.sum(step_loss)
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss is {step_loss} at step {step + 1}; stopped without updating. "
                                    f"Last good checkpoint: {latest_checkpoint(run_dir) or 'none'}")
            grad_norm = dist.clip_grad_norm(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pos += global_bs
            step_tokens = sum(len(x) for x, _ in examples)
            tokens_seen += step_tokens
            meter.tick(step_tokens)
            logger.advance(1, loss=step_loss)

            if step % cfg.log.log_every == 0 or step == cfg.optim.max_steps:
                logger.log({"loss/train": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                            "tokens": tokens_seen, "epoch": pos / len(train_set), **meter.read()}, step)
            over_time = cfg.run.max_minutes and time.time() - t_start > cfg.run.max_minutes * 60
            if ((cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == cfg.optim.max_steps
                    or over_time or stop.requested):
                val_loss = evaluate(model, val, bs, tok.pad_token_id, dist)
                logger.log({"loss/val": val_loss, "ppl/val": math.exp(min(val_loss, 50))}, step)
                if dist.is_main:
                    if val_loss < best_val:
                        save_model(run_dir / "best", dist.unwrap(model), tok)
                    prompts = [_as_prompt(tok, p, cfg.data.template) for p in cfg.sample_prompts]
                    chat = cfg.data.template == "chat"  # the rendered template has its own markers, no BOS
                    for p, s in zip(cfg.sample_prompts, sample_texts(dist.unwrap(model), tok, prompts,
                                                                     add_special_tokens=not chat)):
                        logger.log_text(f"sample/{p}", s, step)
                        logger.write(f"  {p!r} -> {s!r}")
                best_val = min(best_val, val_loss)
            if (cfg.log.save_every and step % cfg.log.save_every == 0) or stop.requested or over_time:
                checkpoint()
            if stop.requested or over_time:
                break
        if saved_step != step:
            checkpoint()

    summary: dict[str, Any] = {}
    if dist.is_main:
        final = run_dir / "final"
        if (run_dir / "best").exists():
            if final.exists():
                shutil.rmtree(final)
            shutil.copytree(run_dir / "best", final)
        else:
            save_model(final, dist.unwrap(model), tok)
        summary = {"steps": step, "params": n_params, "train_pairs": len(train_set), "val_pairs": len(val),
                   "best_val_loss": best_val if math.isfinite(best_val) else None,
                   "val_ppl": math.exp(best_val) if math.isfinite(best_val) else None,
                   "wall_s": round(time.time() - t_start, 1), "final_model": str(final)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        logger.write(f"done: best val loss {best_val:.4f} after {step} steps; model in {final}")
    dist.barrier()
    return summary


def _as_prompt(tok: Any, prompt: str, template: str) -> str:
    """The text the model sees before its answer, as in training (chat template or plain)."""
    if template == "chat":
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
    return prompt
