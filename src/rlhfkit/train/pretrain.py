"""Pretrain a causal LM on a text corpus: `rlhfkit pretrain`.

Documents are split into train/validation *by document*, tokenized (BOS before each), concatenated into
one stream per split and cut into fixed blocks of seq_len + 1 tokens. Each epoch visits the train blocks
in a fresh seeded order, shifted by a seeded offset so block boundaries move between epochs. The data
position is a single global counter of blocks consumed, so a checkpoint resumes exactly, on any number of
processes with the same global batch.

Departures from the usual recipe, and why:
  * validation uses the first `eval_sequences` blocks of the held-out stream, always the same ones, so
    curves are comparable across evaluations and runs;
  * `final/` is the model with the best validation loss (what early stopping is for), not the last one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from typing import Any

import numpy as np
import torch

from rlhfkit.config import PretrainConfig
from rlhfkit.data.datasets import EpochSampler
from rlhfkit.data.sources import load_texts
from rlhfkit.errors import TrainingError
from rlhfkit.models.factory import build_model, count_params, get_tokenizer, lr_lambda, make_optimizer
from rlhfkit.models.ops import causal_lm_loss
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


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def split_documents(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, round(val_fraction * len(texts)))
    return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]


def tokenize_stream(tok: Any, texts: list[str]) -> np.ndarray:
    """BOS doc BOS doc ... EOS as one int32 array (BOS = EOS for our tokenizers)."""
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    if tok.bos_token_id is None or ids[0][:1] != [tok.bos_token_id]:
        ids = [[tok.eos_token_id, *x] for x in ids]  # tokenizers without BOS: separate docs with EOS
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32)
    return np.concatenate([flat, np.array([tok.eos_token_id], dtype=np.int32)])


class BlockSampler:
    """Blocks of seq_len + 1 tokens from a stream, in a seeded order per epoch (see module doc)."""

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int) -> None:
        self.stream, self.L = stream, seq_len
        self.n = (len(stream) - seq_len) // seq_len  # blocks per epoch, whatever the epoch's offset
        if self.n < 1:
            raise TrainingError(f"corpus too small: {len(stream)} tokens for seq_len {seq_len}")
        self.order = EpochSampler(self.n, seed)

    def batch(self, pos: int, size: int) -> torch.Tensor:
        """Blocks pos .. pos+size-1 of the global order: (size, seq_len + 1) int64."""
        rows = []
        for e, i in self.order.indices(pos, size):
            start = self.order.epoch(e)[1] % self.L + i * self.L  # the epoch's shift moves boundaries
            rows.append(self.stream[start:start + self.L + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def unigram_ppl(train: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on `train`, on `targets`: the floor to beat."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[targets].mean()))


# ---------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, dist: Dist) -> float:
    """Mean token loss over the validation blocks (sharded over ranks, summed, divided once)."""
    model.eval()
    mine = blocks[dist.rank::dist.world]
    total, count = 0.0, 0
    for i in range(0, len(mine), batch_size):
        b = mine[i:i + batch_size].to(dist.device)
        loss, n = causal_lm_loss(model(input_ids=b[:, :-1]).logits, b[:, 1:])
        total += float(loss) * int(n)
        count += int(n)
    model.train()
    return dist.sum(total) / max(dist.sum(count), 1)


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tok: Any, prompts: list[str], max_new_tokens: int = 40,
                 temperature: float = 0.8, top_k: int = 40, add_special_tokens: bool = True) -> list[str]:
    """The sampled continuation of each prompt, decoded, one prompt at a time (a quick look during
    training; RL uses the batched rollout engine)."""
    model.eval()
    out = []
    # Sampling must not move the training RNG: a run that stops (and samples) early and resumes has to
    # follow the same random stream (dropout) as one that never stopped.
    with torch.random.fork_rng(devices=[]):
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
            ids = ids.to(next(model.parameters()).device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(gen[0, ids.size(1):], skip_special_tokens=True))
    model.train()
    return out


def train(cfg: PretrainConfig) -> dict[str, Any]:
    t_start = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    dist = Dist(cfg.run.device, cfg.run.precision)
    run_dir = default_run_dir("pretrain", cfg.log.run_dir)
    if dist.is_main:
        write_run_config(run_dir, cfg)
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None

    # Data and tokenizer. A resumed run reuses the tokenizer it trained, so ids never change mid-run.
    texts = load_texts(cfg.data.source, cfg.data.text_field, cfg.data.max_docs)
    train_docs, val_docs = split_documents(texts, cfg.data.val_fraction, cfg.run.seed)
    tok_dir = run_dir / "tokenizer"
    if dist.is_main and (cfg.tokenizer.path or not (tok_dir / "tokenizer.json").exists()):
        get_tokenizer(cfg.tokenizer, cfg.model.name_or_path, train_docs).save_pretrained(tok_dir)
    dist.barrier()  # the other ranks read what rank 0 trained (or copied), never a half-written file
    from rlhfkit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    train_ids, val_ids = tokenize_stream(tok, train_docs), tokenize_stream(tok, val_docs)
    L = cfg.data.seq_len
    sampler = BlockSampler(train_ids, L, cfg.run.seed)
    n_val_blocks = (len(val_ids) - 1) // L
    if cfg.eval_sequences:
        n_val_blocks = min(n_val_blocks, cfg.eval_sequences)
    if n_val_blocks < 1:
        raise TrainingError(f"validation split too small ({len(val_ids)} tokens) for seq_len {L}: raise "
                            "data.val_fraction")
    val_blocks = torch.from_numpy(np.stack([val_ids[i * L:i * L + L + 1] for i in range(n_val_blocks)])
                                  .astype(np.int64))
    floor_ppl = unigram_ppl(train_ids, val_blocks[:, 1:].numpy().ravel(), len(tok))

    # Model, optimizer, schedule.
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, tok).to(dist.device)
    n_params = count_params(model)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim))
    step, pos, best_val, bad_evals, tokens_seen = 0, 0, math.inf, 0, 0
    if ckpt is not None:
        load_weights_into(model, ckpt / "model")
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, pos, best_val = state["step"], state["pos"], state["best_val"]
        bad_evals, tokens_seen = state["bad_evals"], state["tokens_seen"]
    model, optimizer = dist.prepare(model, optimizer)
    model.train()

    bs, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    global_bs = bs * accum * dist.world
    mcfg = dist.unwrap(model).config
    flops_tok = model_flops_per_token(n_params, mcfg.num_hidden_layers, mcfg.hidden_size, L,
                                      frozen=count_params(model, frozen_only=True))
    meter = Throughput(flops_tok, peak_flops(dist.device))
    logger = MetricLogger(run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=step,
                          desc="pretrain", is_main=dist.is_main)
    logger.write(f"pretrain: {n_params / 1e6:.2f}M params, vocab {len(tok)}, {len(train_docs)} train / "
                 f"{len(val_docs)} val documents, {len(train_ids)} train tokens ({sampler.n} blocks of {L}), "
                 f"global batch {global_bs} x {L} tokens, {dist.world} process(es) on {dist.device}"
                 + (f"; resumed from {ckpt} at step {step}" if ckpt else ""))

    saved_step = step

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if dist.is_main:
            save_checkpoint(run_dir, step, models={"model": dist.unwrap(model)}, tokenizer=tok, keep=cfg.log.keep_checkpoints,
                            state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "pos": pos, "best_val": best_val, "bad_evals": bad_evals,
                                   "tokens_seen": tokens_seen})
        dist.barrier()

    with GracefulStop() as stop, logger:
        while step < cfg.optim.max_steps:
            # One optimizer step over the global batch; this rank takes its slice, in micro-batches.
            rows = sampler.batch(pos, global_bs)[dist.shard(global_bs)]
            step_loss = 0.0
            for k in range(accum):
                mb = rows[k * bs:(k + 1) * bs].to(dist.device)
                with dist.no_sync(model, sync=(k == accum - 1)):
                    loss, _ = causal_lm_loss(model(input_ids=mb[:, :-1]).logits, mb[:, 1:])
                    dist.backward(loss / accum)  # equal token counts, so the mean of means is exact
                step_loss += loss.item() / accum
            if not math.isfinite(step_loss):
                last = latest_checkpoint(run_dir)
                raise TrainingError(f"loss is {step_loss} at step {step + 1}; stopped without updating. "
                                    f"Last good checkpoint: {last or 'none'} (lower optim.lr?)")
            grad_norm = dist.clip_grad_norm(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pos += global_bs
            tokens_seen += global_bs * L
            meter.tick(global_bs * L)
            logger.advance(1, loss=step_loss)

            if step % cfg.log.log_every == 0 or step == cfg.optim.max_steps:
                m = {"loss/train": dist.mean(step_loss), "lr": scheduler.get_last_lr()[0],
                     "grad_norm": grad_norm, "tokens": tokens_seen, "epoch": pos / sampler.n, **meter.read()}
                logger.log(m, step)
            over_time = cfg.run.max_minutes and time.time() - t_start > cfg.run.max_minutes * 60
            # Evaluate on schedule, at the end, and whenever the run stops early (time limit, Ctrl-C).
            evals_now = ((cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == cfg.optim.max_steps
                         or over_time or stop.requested)
            if evals_now:
                val_loss = evaluate(model, val_blocks, bs, dist)
                improved = val_loss < best_val
                best_val, bad_evals = (val_loss, 0) if improved else (best_val, bad_evals + 1)
                logger.log({"loss/val": val_loss, "ppl/val": math.exp(val_loss), "ppl/unigram": floor_ppl}, step)
                if dist.is_main:
                    if improved:
                        save_model(run_dir / "best", dist.unwrap(model), tok)
                    for p, s in zip(cfg.sample_prompts, sample_texts(dist.unwrap(model), tok, cfg.sample_prompts)):
                        logger.log_text(f"sample/{p}", p + s, step)
                        logger.write(f"  sample: {p + s!r}")
            early = cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience
            if early:
                logger.write(f"early stop: no validation improvement in {bad_evals} evaluations")
            if (cfg.log.save_every and step % cfg.log.save_every == 0) or stop.requested or over_time or early:
                checkpoint()
            if stop.requested or over_time or early:
                break
        if saved_step != step:
            checkpoint()

    # final/ = best validation model (or the last one if no evaluation ran).
    summary: dict[str, Any] = {}
    if dist.is_main:
        final = run_dir / "final"
        if (run_dir / "best").exists():
            if final.exists():
                shutil.rmtree(final)
            shutil.copytree(run_dir / "best", final)
        else:
            save_model(final, dist.unwrap(model), tok)
        wall = time.time() - t_start
        summary = {"steps": step, "stopped_early": bool(step < cfg.optim.max_steps), "params": n_params,
                   "vocab_size": len(tok), "train_tokens_seen": tokens_seen,
                   "best_val_loss": best_val if math.isfinite(best_val) else None,
                   "val_ppl": math.exp(best_val) if math.isfinite(best_val) else None,
                   "unigram_val_ppl": floor_ppl, "wall_s": round(wall, 1),
                   "final_model": str(final)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        logger.write(f"done: best val ppl {summary['val_ppl'] or float('nan'):.2f} (unigram floor "
                     f"{floor_ppl:.1f}) after {step} steps, {wall:.0f}s; model in {final}")
    dist.barrier()
    return summary
