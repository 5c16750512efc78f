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

import math
from typing import Any

import numpy as np
import torch

from rlhfkit.config import PretrainConfig
from rlhfkit.data.datasets import EpochSampler
from rlhfkit.data.sources import load_texts
from rlhfkit.errors import TrainingError
from rlhfkit.models.factory import build_model, count_params, get_tokenizer
from rlhfkit.models.ops import causal_lm_loss
from rlhfkit.train import driver
from rlhfkit.utils.distributed import Dist
from rlhfkit.utils.logging import MetricLogger  # noqa: F401  (tests hook MetricLogger.log here)
from rlhfkit.utils.runtime import seed_everything


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
    run = driver.setup("pretrain", cfg, cfg.run.precision)
    dist = run.dist

    # Data and tokenizer. A resumed run reuses the tokenizer it trained, so ids never change mid-run.
    texts = load_texts(cfg.data.source, cfg.data.text_field, cfg.data.max_docs)
    train_docs, val_docs = split_documents(texts, cfg.data.val_fraction, cfg.run.seed)
    tok_dir = run.run_dir / "tokenizer"
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

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, tok).to(dist.device)
    n_params = count_params(model)
    bs, accum, global_bs = cfg.optim.batch_size, cfg.optim.grad_accum, run.global_bs
    header = (f"{n_params / 1e6:.2f}M params, vocab {len(tok)}, {len(train_docs)} train / {len(val_docs)} "
              f"val documents, {len(train_ids)} train tokens ({sampler.n} blocks of {L}), global batch "
              f"{global_bs} x {L} tokens")
    model = run.start(model, tok, header, select="loss/val", seq_len=L)  # final/: the best validation loss

    def step() -> driver.Step:
        # The global batch of blocks at pos; this rank takes its slice, in micro-batches.
        rows = sampler.batch(run.pos, global_bs)[dist.shard(global_bs)]  # (bs * accum, L + 1)
        step_loss = 0.0
        for mb in run.micro_batches(rows):
            mb = mb.to(dist.device)
            loss, _ = causal_lm_loss(model(input_ids=mb[:, :-1]).logits, mb[:, 1:])
            dist.backward(loss / accum)  # equal token counts, so the mean of means is exact
            step_loss += loss.item() / accum
        return driver.Step(dist.mean(step_loss), tokens=global_bs * L)

    def validate() -> dict[str, float]:
        val_loss = evaluate(model, val_blocks, bs, dist)
        return {"loss/val": val_loss, "ppl/val": math.exp(val_loss), "ppl/unigram": floor_ppl}

    def samples(step: int) -> None:
        for p, s in zip(cfg.sample_prompts, sample_texts(dist.unwrap(model), tok, cfg.sample_prompts)):
            run.logger.log_text(f"sample/{p}", p + s, step)
            run.logger.write(f"  sample: {p + s!r}")

    run.train(step, sampler.n, evaluate=validate, samples=samples, patience=cfg.early_stop_patience)
    ppl = math.exp(run.best_val) if run.best_val is not None else None
    return run.finish({"stopped_early": run.step < cfg.optim.max_steps, "params": n_params,
                       "vocab_size": len(tok), "train_tokens_seen": run.state["tokens_seen"],
                       "best_val_loss": run.best_val, "val_ppl": ppl, "unigram_val_ppl": floor_ppl},
                      f"best val ppl {ppl or float('nan'):.2f} (unigram floor {floor_ppl:.1f})")
