"""Reward-model losses: pure functions of scalar rewards (and masks) returning (loss, stats).

    bradley_terry_loss(r_chosen, r_rejected, margin)   pairs, edits: -log sigmoid(r_c - r_r - margin)
    ranking_loss(rewards, mask)                        K-wise rankings: BT over all K(K-1)/2 pairs
    regression_loss(pred, target, weight)              ratings: (weighted) mean squared error

Shapes: B = pairs / groups / rated texts in the batch, K = completions per ranking (best first).

Where these follow or depart from the papers:
  * The margin is subtracted inside the sigmoid as in Llama 2 (Touvron et al. 2023, eq. 2): a pair the
    raters separate by a lot must be separated by at least `margin` before its loss gets small.
  * ranking_loss is InstructGPT's (Ouyang et al. 2022, eq. 1): every ranking contributes the mean of its
    C(K, 2) pair losses, so a prompt with many completions does not outweigh one with two, and all pairs
    of a prompt share one forward pass (each completion is scored once, not K - 1 times). Rankings of
    different K share a batch through `mask` (padding slots at the end).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_pair_indices(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, worse) positions of every ordered pair of a best-first ranking of k items.

    k = 3 -> better [0, 0, 1], worse [1, 2, 2]: K(K-1)/2 pairs, each once.
    """
    better, worse = torch.triu_indices(k, k, offset=1)
    return better, worse


def ranking_to_pairs(ranked: list) -> list[tuple]:
    """A best-first list -> every (chosen, rejected) pair it implies (the export's expansion)."""
    better, worse = ranking_pair_indices(len(ranked))
    return [(ranked[i], ranked[j]) for i, j in zip(better.tolist(), worse.tolist())]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over pairs.

    r_chosen, r_rejected: (B,) rewards of the preferred and the other completion. margin: (B,) or a
    scalar, >= 0 (0 = plain BT). weight: (B,) per-pair weights (e.g. 0 for padding), default all 1.
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin
    per_pair = -F.logsigmoid(logits)  # log-sigmoid is stable for large |logits|, unlike log(sigmoid)
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair.dtype)
    loss = (per_pair * w).sum() / w.sum().clamp(min=1e-8)
    with torch.no_grad():
        n = w.sum().clamp(min=1e-8)
        stats = {"reward/accuracy": float(((diff > 0).to(w.dtype) * w).sum() / n),
                 "reward/margin": float((diff * w).sum() / n),
                 "reward/chosen": float((r_chosen * w).sum() / n),
                 "reward/rejected": float((r_rejected * w).sum() / n)}
    return loss, stats


def ranking_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """InstructGPT's K-wise loss: for each ranking, the mean BT loss over all its ordered pairs.

    rewards: (B, K), column 0 the best completion. mask: (B, K), 1 for real completions (a ranking of
    k < K completions fills columns 0..k-1). Rankings with fewer than 2 completions are skipped.
    """
    K = rewards.shape[1]
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    better, worse = ranking_pair_indices(K)
    diff = rewards[:, better] - rewards[:, worse]  # (B, P) with P = K(K-1)/2
    valid = (mask[:, better] & mask[:, worse]).to(rewards.dtype)  # (B, P)
    n_pairs = valid.sum(1)  # (B,)
    per_group = (-F.logsigmoid(diff) * valid).sum(1) / n_pairs.clamp(min=1)  # mean over own pairs
    has_pairs = (n_pairs > 0).to(rewards.dtype)
    loss = (per_group * has_pairs).sum() / has_pairs.sum().clamp(min=1)
    with torch.no_grad():
        n = valid.sum().clamp(min=1)
        stats = {"reward/accuracy": float(((diff > 0).to(rewards.dtype) * valid).sum() / n),
                 "reward/margin": float((diff * valid).sum() / n),
                 "reward/pairs": float(valid.sum())}
    return loss, stats


def regression_loss(pred: torch.Tensor, target: torch.Tensor,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(Weighted) mean squared error of predicted vs human ratings: (B,), (B,) -> scalar."""
    err = pred - target
    w = torch.ones_like(err) if weight is None else weight.to(err.dtype)
    loss = (err ** 2 * w).sum() / w.sum().clamp(min=1e-8)
    with torch.no_grad():
        stats = {"reward/mae": float((err.abs() * w).sum() / w.sum().clamp(min=1e-8))}
    return loss, stats
