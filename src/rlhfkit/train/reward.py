"""Train a reward model on human feedback: `rlhfkit reward`.

Top to bottom:
  1. data: rated texts and best-first rankings (vader snippets, feedback exports), split by item with a
     hash of the item id (test ids written to split.json; nothing of a test item is trained on);
  2. examples for the loss: rating targets (regression), pairs (bt) or K-wise rankings (ranking), the
     comparisons between rated texts redrawn every epoch;
  3. fit: linear on frozen features (closed-form weighted ridge for regression, L-BFGS for bt/ranking;
     the L2 penalty is picked on validation) or deep (AdamW over mini-batches; the best validation step
     is kept);
  4. normalise rewards to mean 0 / std 1 on training texts, evaluate on validation (which also fits the
     preference scale) and test, save final/ (reward_config.json holds everything) and summary.json.

Choices worth knowing:
  * regression targets are standardised (train mean/std) and `target=individual` weighs each text by its
    number of ratings: the squared error to every rating equals n * (error to the mean)^2 + a constant;
  * comparisons from ratings stay within a domain and skip pairs closer than `loss.min_gap` (mostly noise);
  * validation selects (L2 penalty, step, preference scale); test is read once, at the end.

Several processes (torchrun; deep models only): every rank walks the same global batch of
batch_size x grad_accum x world examples and trains on its slice; each micro-batch's loss is weighted by its
share of the global batch's loss weight (examples, or rating weights for regression) and the gradients are
summed over ranks, so a step is the one a single process makes on the whole batch, whatever the split.
A linear model's fit (closed form / L-BFGS on cached features) runs on rank 0 while the others wait.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.config import RewardConfig, to_dict
from rlhfkit.data.reward_data import (
    Ranking,
    RatedText,
    load_reward_data,
    rated_groups,
    rated_pairs,
    rater_half,
    split_of,
    write_split,
)
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.eval import reward_metrics as M
from rlhfkit.models.embeddings import Encoder, load_base_model
from rlhfkit.models.factory import apply_lora, count_params, enable_gradient_checkpointing
from rlhfkit.models.heads import ScalarHeadModel
from rlhfkit.models.reward_models import DeepRewardModel, LinearRewardModel, TextRewardModel
from rlhfkit.models.reward_text import CutStats, TextTokenizer, cut_message
from rlhfkit.train import driver
from rlhfkit.train.reward_losses import bradley_terry_loss, ranking_loss, ranking_to_pairs, regression_loss
from rlhfkit.utils.distributed import Dist
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (
    default_run_dir,
    quiet_hf,
    seed_everything,
    set_threads,
)

SPLITS = ("train", "val", "test")
N_REFERENCE = 2048  # training texts the normalisation mean/std are measured on


# ---------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------
@dataclass
class Example:
    texts: list[tuple[str, str]]  # (prompt, completion): one rated text, or completions best first (a pair is K = 2)
    target: float = 0.0   # regression: standardised mean rating
    weight: float = 1.0   # regression: relative number of ratings behind the target (target=individual)
    margin: float = 0.0   # bt: margin in reward units


def make_examples(cfg: RewardConfig, rated: list[RatedText], rankings: list[Ranking], y_mu: float, y_sd: float,
                  rng: np.random.Generator) -> list[Example]:
    loss = cfg.loss
    if loss.kind == "regression":
        n_avg = float(np.mean([len(it.ratings) for it in rated]))
        ex = [Example([(it.prompt, it.completion)], (it.mean - y_mu) / y_sd,
                      len(it.ratings) / n_avg if loss.target == "individual" else 1.0) for it in rated]
    elif loss.kind == "bt":
        ex = [Example([c, r], margin=loss.margin * rk.margin)
              for rk in rankings for c, r in ranking_to_pairs([(rk.prompt, c) for c in rk.completions])]
        ex += [Example([_pc(rated[i]), _pc(rated[j])], margin=loss.margin * gap)
               for i, j, gap in rated_pairs(rated, loss.per_item, loss.min_gap, rng)]
    else:  # ranking: each ranking stays one example (InstructGPT), rated texts give K-wise rankings
        ex = [Example([(rk.prompt, c) for c in rk.completions]) for rk in rankings]
        n_groups = len(rated) * loss.per_item // loss.group_size
        ex += [Example([_pc(rated[i]) for i in g])
               for g in rated_groups(rated, n_groups, loss.group_size, loss.min_gap, rng)]
    order = rng.permutation(len(ex))
    return [ex[i] for i in order]


def _pc(it: RatedText) -> tuple[str, str]:
    return it.prompt, it.completion


Scorer = Callable[[list[tuple[str, str]]], np.ndarray]  # raw scores of (prompt, completion) texts


def length_grouped(examples: list[Example], batch_size: int, rng: np.random.Generator) -> list[Example]:
    """Reorder so that each run of batch_size examples holds texts of similar length: batches pad to their
    longest text, and random batches of snippets pad ~2x. Batches keep a random order; within a window of
    50 batches examples are sorted by length (as HF's group_by_length)."""
    window = batch_size * 50
    full, partial = [], []
    for s in range(0, len(examples), window):
        part = sorted(examples[s:s + window], key=lambda e: max(len(p) + len(c) for p, c in e.texts))
        for i in range(0, len(part), batch_size):
            (full if len(part[i:i + batch_size]) == batch_size else partial).append(part[i:i + batch_size])
    return [e for i in rng.permutation(len(full)) for e in full[i]] + [e for b in partial for e in b]


def batch_loss(kind: str, scores: torch.Tensor, batch: list[Example]) -> tuple[torch.Tensor, dict]:
    """The loss of a batch whose texts were scored in order: scores (sum of group sizes,)."""
    if kind == "regression":
        target = scores.new_tensor([e.target for e in batch])
        return regression_loss(scores, target, scores.new_tensor([e.weight for e in batch]))
    if kind == "bt":
        pair = scores.view(-1, 2)  # (B, 2): chosen, rejected
        margin = scores.new_tensor([e.margin for e in batch])
        return bradley_terry_loss(pair[:, 0], pair[:, 1], margin if bool(margin.any()) else None)
    sizes = [len(e.texts) for e in batch]  # ranking: pad groups to (B, K_max) with a mask
    rows = torch.arange(len(batch)).repeat_interleave(torch.tensor(sizes))
    cols = torch.cat([torch.arange(k) for k in sizes])
    grid = scores.new_zeros(len(batch), max(sizes)).index_put((rows, cols), scores)
    mask = torch.zeros(len(batch), max(sizes), dtype=torch.bool).index_put((rows, cols), torch.tensor(True))
    return ranking_loss(grid, mask.to(scores.device))


def loss_weight(kind: str, batch: list[Example]) -> float:
    """The denominator batch_loss divides by: the rating weights (regression) or the number of examples."""
    return float(sum(e.weight for e in batch)) if kind == "regression" else float(len(batch))


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def comparison_accuracy(score: Scorer, rankings: list[Ranking], cutter: TextTokenizer | None = None) -> dict:
    """Strict pairwise accuracy, ties and ties-as-half over every pair the rankings imply
    (M.pair_metrics). With the model's cutter, a pair whose two texts are the same tokens after cutting is
    a tie whatever float noise of batching says."""
    pairs = [p for rk in rankings for p in ranking_to_pairs([(rk.prompt, c) for c in rk.completions])]
    flat = [t for p in pairs for t in p]
    diff = score(flat).reshape(-1, 2) @ np.array([1.0, -1.0])
    if cutter is not None and pairs:
        rows = cutter.ids([p for p, _ in flat], [c for _, c in flat])
        cutter.take_stats()  # counted once, by cut_split
        diff[np.array([a == b for a, b in zip(rows[0::2], rows[1::2])])] = 0.0
    return M.pair_metrics(diff)


def val_score(score: Scorer, rated: list[RatedText], rankings: list[Ranking]) -> float:
    """What model selection maximises: Pearson r with the mean rating of the validation texts, or (no
    rated texts) strict pairwise accuracy on validation comparisons."""
    if rated:
        return M.pearson(score([_pc(it) for it in rated]), [it.mean for it in rated])
    return comparison_accuracy(score, rankings)["pair_acc"] if rankings else float("nan")


def evaluate(score: Scorer, rated: list[RatedText], rankings: list[Ranking],
             scale: float | None, raters: str, seed: int, cutter: TextTokenizer | None = None) -> dict[str, Any]:
    """Full metrics on a split, per domain. scale None = fit the preference scale here (validation only)."""
    out: dict[str, Any] = {}
    if rated:
        s = score([_pc(it) for it in rated])
        domains = np.array([it.domain for it in rated])
        ratings = [it.all_ratings for it in rated]
        allm = M.rating_metrics(s, ratings, domains, scale, np.random.default_rng(seed))
        out["all"] = allm
        for d in sorted(set(domains)):
            sel = np.flatnonzero(domains == d)
            m = M.rating_metrics(s[sel], [ratings[i] for i in sel], domains[sel], allm["preference_scale"],
                                 np.random.default_rng(seed))
            if raters != "all":  # agreement with the people this model never learned from
                other = "odd" if raters == "even" else "even"
                m["pearson_other_raters"] = M.pearson(s[sel], [np.mean(rater_half(ratings[i], other)) for i in sel])
            if d != "feedback":  # the human ceiling and the lexicon baseline on the very same texts
                m["one_rater_r"] = M.one_rater_r([ratings[i] for i in sel])
                lexicon = M.vader_scores([rated[i].text for i in sel])
                m["vader_lexicon_r"] = M.pearson(lexicon, [np.mean(ratings[i]) for i in sel])
            out[d] = m
    if rankings:
        out["comparisons"] = comparison_accuracy(score, rankings, cutter)
    return out


# ---------------------------------------------------------------------------------------------------
# Linear fit on frozen features
# ---------------------------------------------------------------------------------------------------
def fit_linear_weights(Z: torch.Tensor, flat: torch.Tensor, examples: list[Example], kind: str,
                       lam: float) -> tuple[torch.Tensor, float]:
    """w, b of r = Z w + b for standardised features Z (N, D); flat indexes the rows of Z that the
    examples' texts are, in order. Regression: closed-form weighted ridge with an unpenalised bias.
    bt / ranking: full-batch L-BFGS on the mean loss + lam / (2 n) |w|^2 (ridge's penalty per example);
    the bias cancels in every comparison, so it stays 0."""
    if kind == "regression":
        A = torch.cat([Z[flat], torch.ones(len(flat), 1)], 1).double()  # (n, D + 1)
        y = torch.tensor([e.target for e in examples], dtype=torch.float64)
        wts = torch.tensor([e.weight for e in examples], dtype=torch.float64)
        P = torch.diag(torch.cat([torch.full((Z.shape[1],), lam), torch.zeros(1)])).double()
        theta = torch.linalg.solve(A.T @ (A * wts[:, None]) + P, A.T @ (wts * y)).float()
        return theta[:-1], float(theta[-1])
    w = torch.zeros(Z.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss, _ = batch_loss(kind, (Z @ w)[flat], examples)  # score each distinct text once, then gather
        loss = loss + lam / (2 * len(examples)) * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), 0.0


def fit_linear(cfg: RewardConfig, enc: Encoder, examples: list[Example], val_rated: list[RatedText],
               val_rankings: list[Ranking], logger: MetricLogger) -> tuple[LinearRewardModel, dict]:
    texts = sorted({t for e in examples for t in e.texts})
    row = {t: i for i, t in enumerate(texts)}
    X = torch.from_numpy(enc.encode([c for _, c in texts], [p for p, _ in texts], progress=True))  # (N, D)
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-6)
    Z = (X - mu) / sd
    flat = torch.tensor([row[t] for e in examples for t in e.texts])
    best: tuple[float, Any] = (-math.inf, None)
    for lam in [float(x) for x in cfg.model.l2]:
        w, b = fit_linear_weights(Z, flat, examples, cfg.loss.kind, lam)
        rm = LinearRewardModel(enc, w, b, mu, sd)
        v = val_score(_cached_scorer(rm, enc), val_rated, val_rankings)
        logger.write(f"  l2 {lam:g}: validation {'pearson' if val_rated else 'pair accuracy'} {v:.4f}")
        if v > best[0] or best[1] is None:
            best = (v, (lam, rm))
    lam, rm = best[1]
    return rm, {"l2": lam, "val_score": best[0], "n_texts": len(texts),
                "solver": "closed_form" if cfg.loss.kind == "regression" else "lbfgs"}


def _cached_scorer(rm: LinearRewardModel, enc: Encoder) -> Scorer:
    """Raw scores from the disk cache of features (the texts seen in training are not encoded again)."""
    return lambda pcs: rm.from_features(torch.from_numpy(enc.encode([c for _, c in pcs],
                                                                   [p for p, _ in pcs]))).numpy()


def _model_scorer(rm: Any) -> Scorer:
    return lambda pcs: rm.raw_scores([p for p, _ in pcs], [c for _, c in pcs]).numpy()


# ---------------------------------------------------------------------------------------------------
# Deep: backbone + scalar head, AdamW
# ---------------------------------------------------------------------------------------------------
def build_deep(cfg: RewardConfig, device: torch.device) -> DeepRewardModel:
    backbone, tok = load_base_model(cfg.model.backbone)
    net = ScalarHeadModel(backbone)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    if cfg.model.lora_r:
        # Adapters on every linear layer of the backbone; the scalar head is trained in full.
        net.backbone = apply_lora(backbone, cfg.model, causal_lm=False)
    return DeepRewardModel(net.to(device), tok, cfg.model.pooling, cfg.model.max_len, bf16=cfg.model.bf16,
                           truncation=cfg.model.truncation)


def passes(batch: list[Example], rows: list[list[int]], budget: int) -> list[tuple[list[Example], list[list[int]]]]:
    """Split a micro-batch (and its token rows, in the order of its texts) into consecutive runs of
    examples whose padded size (texts x longest text) stays within budget tokens; an example larger than
    the budget is a pass of its own. budget 0: one pass."""
    out: list[tuple[list[Example], list[list[int]]]] = []
    part: list[Example] = []
    part_rows: list[list[int]] = []
    pos = 0
    for e in batch:
        mine = rows[pos:pos + len(e.texts)]
        pos += len(e.texts)
        longest = max([len(r) for r in part_rows + mine])
        if part and budget and (len(part_rows) + len(mine)) * longest > budget:
            out.append((part, part_rows))
            part, part_rows = [], []
        part, part_rows = part + [e], part_rows + mine
    if part:
        out.append((part, part_rows))
    return out


def fit_deep(cfg: RewardConfig, rm: DeepRewardModel, epoch_examples: Callable[[int], list[Example]],
             val_rated: list[RatedText], val_rankings: list[Ranking], run: driver.Run, logger: MetricLogger) -> dict:
    """Train the deep model on the supervised driver (resume, checkpoints, stops, logging, selection). Each
    epoch draws fresh comparisons between rated texts in a fresh order, so the stage counts its own epoch
    and position in it; the model is called through the pooling of `rm`, so it is not wrapped and the
    driver sums the gradients over processes."""
    t0, kind, dist = time.time(), cfg.loss.kind, run.dist
    global_bs = run.global_bs
    trained = count_params(rm.net) - count_params(rm.net, frozen_only=True)
    run.start(rm.net, None, f"deep model {count_params(rm.net) / 1e6:.2f}M params ({trained / 1e6:.2f}M trained)",
              select="val/score" if cfg.select == "best" else None, higher_better=True, ties_to_later=True,
              seq_len=cfg.model.max_len, counters={"epoch": 0, "epoch_pos": 0}, wrap=False, logger=logger)
    st = run.state
    examples = epoch_examples(st["epoch"])

    def next_batch(n: int) -> list[Example]:
        nonlocal examples
        out = []
        while len(out) < n:
            if st["epoch_pos"] >= len(examples):  # new epoch: fresh comparisons between rated texts, fresh order
                st["epoch"], st["epoch_pos"] = st["epoch"] + 1, 0
                examples = epoch_examples(st["epoch"])
            take = examples[st["epoch_pos"]:st["epoch_pos"] + n - len(out)]
            out += take
            st["epoch_pos"] += len(take)
        return out

    def step() -> driver.Step:
        # The global batch; this rank's slice in micro-batches, each weighted by its share of the global
        # batch's loss weight, so the contributions add up to the loss of the whole batch.
        everyone = next_batch(global_bs)
        total_w = loss_weight(kind, everyone)
        mine = everyone[dist.shard(global_bs)]
        loss_sum, stats, tokens = 0.0, {}, 0
        for k in range(cfg.optim.grad_accum):
            batch = mine[k * cfg.optim.batch_size:(k + 1) * cfg.optim.batch_size]
            rows = rm.text_tokenizer.ids([p for e in batch for p, _ in e.texts], [c for e in batch for _, c in e.texts])
            # Passes of at most model.tokens_per_pass padded tokens: activation memory is bounded whatever
            # the batch size and text length, and the gradients add up to the same step.
            for part, part_rows in passes(batch, rows, cfg.model.tokens_per_pass):
                enc = rm.text_tokenizer.pad(part_rows, rm.device)
                loss, part_stats = batch_loss(kind, rm.forward(**enc), part)
                share = loss_weight(kind, part) / total_w
                (loss * share).backward()
                loss_sum += loss.item() * share
                for name, v in part_stats.items():
                    stats[name] = stats.get(name, 0.0) + float(v) * share
                tokens += int(enc["attention_mask"].sum())
        stats = {name: dist.sum(v) for name, v in stats.items()}
        stats["epoch"] = st["epoch"] + st["epoch_pos"] / max(len(examples), 1)
        return driver.Step(dist.sum(loss_sum), stats, int(dist.sum(tokens)))

    def evaluate() -> dict[str, float]:  # every rank scores the validation set (the same numbers)
        return {"val/score": val_score(_model_scorer(rm), val_rated, val_rankings)}

    run.train(step, len(examples), evaluate=evaluate)
    if cfg.select == "best":
        run.load_best()  # none if it stopped before its first evaluation: the last weights
        best = run.best_val
    else:  # select last: the weights as they are; report the last validation score
        best = val_score(_model_scorer(rm), val_rated, val_rankings)
    if cfg.model.lora_r:  # fold the adapters in: the saved model is a plain backbone, no peft to load it
        rm.net.backbone = rm.net.backbone.merge_and_unload()
    return {"steps": run.step, "stopped_early": run.step < cfg.optim.max_steps, "val_score": best,
            "select": cfg.select, "tokens": st["tokens_seen"], "train_s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------
# Truncation, counts, the run's last line
# ---------------------------------------------------------------------------------------------------
def cut_split(cutter: TextTokenizer, rated: list[RatedText], rankings: list[Ranking]) -> tuple[list[Ranking], dict]:
    """Cut every text of a split by the model's rule (rlhfkit.models.reward_text) and count what it did:
    texts cut, and comparisons whose completions became the same tokens. Returns the rankings without
    those duplicates (a lower-ranked copy is dropped; a pair then has nothing left to compare) and the
    counts. Training uses the returned rankings; evaluation keeps them all (identical texts score as ties,
    which the metrics count)."""
    cutter.take_stats()
    texts = [_pc(it) for it in rated] + [(rk.prompt, c) for rk in rankings for c in rk.completions]
    ids = cutter.ids([p for p, _ in texts], [c for _, c in texts])
    st = cutter.take_stats()
    pos, kept, identical = len(rated), [], 0
    for rk in rankings:
        rows = ids[pos:pos + len(rk.completions)]
        pos += len(rk.completions)
        seen: set[tuple[int, ...]] = set()
        comps = []
        for c, r in zip(rk.completions, rows):
            if tuple(r) not in seen:
                seen.add(tuple(r))
                comps.append(c)
        identical += len(comps) < len(rk.completions)
        if len(comps) >= 2:
            kept.append(dataclasses.replace(rk, completions=comps))
    return kept, {"texts": st.texts, "cut": st.cut, "prompt_cut": st.prompt_cut,
                  "completion_cut": st.completion_cut, "longest": st.longest, "identical_after_cut": identical}


def cut_warning(name: str, c: dict, cfg: RewardConfig, dropped: bool) -> str:
    """A warning line for a split whose texts were cut, or ''."""
    if not c["cut"]:
        return ""
    line = f"warning: {name}: " + cut_message(CutStats(c["texts"], c["cut"], c["prompt_cut"], c["completion_cut"],
                                                       c["longest"]), cfg.model.max_len, cfg.model.truncation)
    if c["identical_after_cut"]:
        line += (f"; {c['identical_after_cut']} comparisons have identical texts after cutting ("
                 + ("dropped from training" if dropped else "kept, they score as ties") + ")")
    return line


def split_counts(rated: list[RatedText], rankings: list[Ranking]) -> str:
    n_pairs = sum(len(rk.completions) * (len(rk.completions) - 1) // 2 for rk in rankings)
    parts = ([f"{n_pairs} pairs" + (f" ({len(rankings)} comparisons)" if n_pairs != len(rankings) else "")]
             if rankings else []) + ([f"{len(rated)} rated texts"] if rated else [])
    return " + ".join(parts) or "0"


def headline(m: dict) -> str:
    """The metrics of one evaluation, as the run's last line says them."""
    if "n_pairs" in m:  # comparisons
        return (f"pair_acc {m['pair_acc']:.3f} [{m['pair_acc_lo']:.3f}, {m['pair_acc_hi']:.3f}] strict, "
                f"ties {m['ties']} ({100 * m['tie_share']:.1f}%), ties as half {m['pair_acc_ties_half']:.3f}, "
                f"{m['n_pairs']} pairs")
    return (f"pearson {m['pearson']:.3f}, spearman {m['spearman']:.3f}, pair_acc_gap1 {m['pair_acc_gap1']:.3f} "
            f"strict (ties {m['ties_gap1']}), ece {m['ece']:.3f}, {m['n']} texts")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def evaluate_files(files: list[str], score: Scorer, cutter: TextTokenizer, cfg: RewardConfig, scale: float,
                   logger: MetricLogger | None, seed: int) -> dict[str, Any]:
    """Every record of each file (no split), cut by the model's rule: metrics per file."""
    out = {}
    for f in files:
        data = load_reward_data([f], [], "all")
        _, cut = cut_split(cutter, data.rated, data.rankings)
        warn = cut_warning(Path(f).name, cut, cfg, dropped=False)
        say = logger.write if logger is not None else print
        if warn:
            say(warn)
        m = evaluate(score, data.rated, data.rankings, scale, "all", seed, cutter)
        m["truncation"] = cut
        out[f] = m
        for name, v in m.items():
            if isinstance(v, dict) and ("n_pairs" in v or "pearson" in v) and name != "all":
                say(f"eval {Path(f).name} {name}: {headline(v)}")
    return out


def evaluate_saved(cfg: RewardConfig) -> dict[str, Any]:
    """`--eval.model DIR --eval.file FILE`: score files with a saved reward model; train nothing."""
    from rlhfkit.models.reward import load_reward

    t0 = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    rm = load_reward(cfg.eval.model, Dist(cfg.run.device).device)
    if not isinstance(rm, TextRewardModel):
        raise ConfigError(f"eval.model={cfg.eval.model!r} is not a trained reward model directory")
    cutter = rm.encoder.text_tokenizer if isinstance(rm, LinearRewardModel) else rm.text_tokenizer
    # The model's own length and rule, whatever the command line says.
    cfg.model.max_len, cfg.model.truncation = cutter.max_len, cutter.truncation
    scale = float(rm.info.get("preference_scale", rm.norm_std)) / rm.norm_std  # for raw scores
    print(f"evaluating {cfg.eval.model} ({rm.kind}, max_len {cutter.max_len}, truncation {cutter.truncation})",
          flush=True)
    files = evaluate_files(cfg.eval.file, _model_scorer(rm), cutter, cfg, scale, None, cfg.run.seed)
    run_dir = default_run_dir("reward", cfg.log.run_dir)
    out = {"model": cfg.eval.model, "eval_files": files, "peak_rss_mb": peak_rss_mb(),
           "wall_s": round(time.time() - t0, 1)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(out, indent=1, default=float))
    print(f"done in {out['wall_s']:.0f}s; peak RSS {out['peak_rss_mb']:.0f} MB; metrics in {run_dir / 'eval.json'}",
          flush=True)
    return out


# ---------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------
def train(cfg: RewardConfig) -> dict[str, Any]:
    if cfg.eval.model:
        return evaluate_saved(cfg)
    t_start = time.time()
    # The backbone may be the output of an earlier stage (so it is not checked at parse time): check it now,
    # before any work.
    from rlhfkit.models.zoo import NAMED_MODELS

    b = cfg.model.backbone
    if b != "minilm" and b not in NAMED_MODELS and not Path(b).exists():
        raise ConfigError(f"model.backbone={b!r}: not found (use 'minilm', a named model such as smollm2, an "
                          "HF model directory or a GGUF file)")
    seed_everything(cfg.run.seed)
    run = driver.setup("reward", cfg)  # threads, processes, run dir + config.yaml, the checkpoint to resume
    dist, device, run_dir = run.dist, run.dist.device, run.run_dir
    if cfg.model.kind == "linear" and not dist.is_main:
        dist.barrier()  # the closed-form / L-BFGS fit runs on rank 0 (module docstring)
        return {}

    # 1. Data, split by item; the test ids are written before anything is fit.
    dc = cfg.data
    data = load_reward_data(dc.source, dc.domains, dc.raters)
    splits = {k: split_of(k, dc.test_fraction, dc.val_fraction, dc.split_seed)
              for k in [it.key for it in data.rated] + [rk.key for rk in data.rankings]}
    if dist.is_main:
        write_split(run_dir / "split.json", splits, dc.split_seed, dc.test_fraction, dc.val_fraction)
    rated = {s: [it for it in data.rated if splits[it.key] == s] for s in SPLITS}
    rankings = {s: [rk for rk in data.rankings if splits[rk.key] == s] for s in SPLITS}
    rated["train"] = [it for it in rated["train"] if it.ratings]  # a rater half may have rated nothing
    if dc.max_items:
        rng = np.random.default_rng(cfg.run.seed)
        rated["train"] = [rated["train"][i] for i in sorted(rng.permutation(len(rated["train"]))[:dc.max_items])]
        rankings["train"] = [rankings["train"][i]
                             for i in sorted(rng.permutation(len(rankings["train"]))[:dc.max_items])]
    if cfg.loss.kind == "regression" and not rated["train"]:
        raise DataError("loss.kind regression needs rated texts (vader or a ratings export); for pairs, "
                        "rankings or edits use loss.kind bt or ranking")
    if not rated["train"] and not rankings["train"]:
        raise DataError("no training items left after the held-out split")
    # The model (or the encoder) first: its tokenizer decides what truncation does to the data.
    if cfg.model.kind == "linear":
        enc = Encoder(cfg.model.backbone, device=device, max_len=cfg.model.max_len, bf16=cfg.model.bf16,
                      layers=cfg.model.layers, truncation=cfg.model.truncation)
        cutter = enc.text_tokenizer
    else:
        rm = build_deep(cfg, device)
        cutter = rm.text_tokenizer
    cuts = {}
    for sp in SPLITS:
        kept, cuts[sp] = cut_split(cutter, rated[sp], rankings[sp])
        if sp == "train":  # a pair of identical texts teaches nothing (and scores as a tie)
            rankings[sp] = kept
    y = np.array([it.mean for it in rated["train"]]) if rated["train"] else np.zeros(1)
    y_mu, y_sd = float(y.mean()), float(y.std()) or 1.0

    def epoch_examples(epoch: int) -> list[Example]:
        rng = np.random.default_rng([cfg.run.seed, epoch])
        ex = make_examples(cfg, rated["train"], rankings["train"], y_mu, y_sd, rng)
        # Grouped by the global batch (what one optimizer step reads), so the order is the same on any
        # number of processes for the same global batch.
        return length_grouped(ex, run.global_bs, rng) if cfg.model.kind == "deep" else ex

    first = epoch_examples(0)
    if not first:
        raise DataError(f"no {cfg.loss.kind} training examples: no rated texts differ by loss.min_gap="
                        f"{cfg.loss.min_gap} and there are no comparisons")
    oc = cfg.optim
    if cfg.model.kind == "deep" and cfg.epochs:
        oc.max_steps = max(1, math.ceil(cfg.epochs * len(first) / run.global_bs))
        oc.warmup_steps = min(oc.warmup_steps, oc.max_steps // 10)
    counts = ", ".join(f"{sp} {split_counts(rated[sp], rankings[sp])}" for sp in SPLITS)
    logger = MetricLogger(run_dir, cfg.log, total_steps=oc.max_steps if cfg.model.kind == "deep" else 0,
                          start_step=run.resume_step, desc="reward", config=to_dict(cfg), is_main=dist.is_main)
    logger.write(f"reward: {cfg.model.kind} on {cfg.model.backbone}, loss {cfg.loss.kind}, raters {dc.raters}; "
                 f"{counts}; {len(first)} examples per epoch"
                 + (f"; skipped {data.skipped}" if data.skipped else ""))
    for sp in SPLITS:
        warn = cut_warning(sp, cuts[sp], cfg, dropped=sp == "train")
        if warn:
            logger.write(warn)
    # Selection reads validation: say how little of it there is.
    n_val_pairs = sum(len(rk.completions) * (len(rk.completions) - 1) // 2 for rk in rankings["val"])
    small = (len(rated["val"]) < 100) if rated["val"] else n_val_pairs < 400
    if cfg.model.kind == "linear" or cfg.select == "best":
        what = "the L2 penalty" if cfg.model.kind == "linear" else "the best step"
        logger.write(f"{'warning: ' if small else ''}validation ({split_counts(rated['val'], rankings['val'])}) "
                     f"picks {what}" + (": that few give an accuracy within about +-"
                                        f"{1 / math.sqrt(max(n_val_pairs, len(rated['val']), 1)):.2f} (95%), so "
                                        "the pick is largely chance; raise data.val_fraction"
                                        + (" or use --select last" if cfg.model.kind == "deep" else "")
                                        if small else ""))

    # 2. Fit.
    with logger:
        if cfg.model.kind == "linear":
            t_fit = time.time()
            rm, fit = fit_linear(cfg, enc, first, rated["val"], rankings["val"], logger)
            fit["train_s"] = round(time.time() - t_fit, 1)
            score = _cached_scorer(rm, enc)
        else:
            fit = fit_deep(cfg, rm, epoch_examples, rated["val"], rankings["val"], run, logger)
            if not dist.is_main:  # rank 0 normalises, evaluates and saves
                dist.barrier()
                return {}

            score = _model_scorer(rm)

        # 3. Normalise on training texts, then evaluate: validation fits the preference scale, test is
        # read once with it.
        ref = sorted({t for e in first for t in e.texts})  # (prompt, completion) pairs
        ref = [ref[i] for i in sorted(np.random.default_rng(cfg.run.seed).permutation(len(ref))[:N_REFERENCE])]
        raw = score(ref)
        rm.norm_mean, rm.norm_std = float(raw.mean()), float(raw.std()) or 1.0
        val = evaluate(score, rated["val"], rankings["val"], None, dc.raters, cfg.run.seed, cutter)
        scale = val["all"]["preference_scale"] if "all" in val else 1.0  # never fitted on test
        test = evaluate(score, rated["test"], rankings["test"], scale, dc.raters, cfg.run.seed + 1, cutter)
        for name, m in test.items():
            if name != "all":
                logger.log({f"test/{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, fit.get("steps", 0),
                           echo=False)
                logger.write(f"test {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                                                         if isinstance(v, float)))
        files = evaluate_files(cfg.eval.file, score, cutter, cfg, scale, logger, cfg.run.seed + 2)

    # 4. Save the model with how it was trained and how it scores.
    wall = time.time() - t_start
    rm.info["name"] = f"{cfg.model.kind}-{Path(cfg.model.backbone).name}-{cfg.loss.kind}-{dc.raters}"
    extra = {"preference_scale": scale * rm.norm_std,
             "training": {"config": to_dict(cfg), **fit, "wall_s": round(wall, 1),
                          "n_train_rated": len(rated["train"]), "n_train_comparisons": len(rankings["train"]),
                          "split": "split.json of the run directory", "reference_texts": len(ref)},
             "eval": {"val": val, "test": test, "files": files, "truncation": cuts}}
    final, tmp = run_dir / "final", run_dir / ".tmp-final"  # written aside, then renamed: never half a model
    shutil.rmtree(tmp, ignore_errors=True)
    rm.save(tmp, extra)
    shutil.copy(run_dir / "split.json", tmp / "split.json")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    rss = peak_rss_mb()
    summary = {"model": str(final), "kind": cfg.model.kind, "backbone": cfg.model.backbone, "loss": cfg.loss.kind,
               "raters": dc.raters, "domains": dc.domains, **fit, "wall_s": round(wall, 1),
               "n_train_rated": len(rated["train"]), "n_train_comparisons": len(rankings["train"]),
               "n": {sp: {"rated": len(rated[sp]), "comparisons": len(rankings[sp])} for sp in SPLITS},
               "test": {k: {m: v for m, v in d.items() if m != "reliability"} for k, d in test.items()},
               "eval_files": {f: {k: {m: v for m, v in d.items() if m != "reliability"} if isinstance(d, dict) else d
                                  for k, d in ev.items()} for f, ev in files.items()},
               "truncation": cuts, "val_score": fit.get("val_score"), "peak_rss_mb": rss}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    # The last line: how many examples each split had, and the held-out metrics said plainly.
    head = [f"test {name}: {headline(m)}" for name, m in test.items() if name != "all"]
    head += [f"{Path(f).name} {name}: {headline(m)}" for f, ev in files.items() for name, m in ev.items()
             if name not in ("all", "truncation")]
    print(f"done in {wall:.0f}s: {counts}; " + ("; ".join(head) or "no test split, no eval.file")
          + f"; peak RSS {rss:.0f} MB; model in {final}", flush=True)
    dist.barrier()
    return summary
