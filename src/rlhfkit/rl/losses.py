"""All RL loss numerics: pure functions on tensors and masks.

Per-token losses are computed separately from their aggregation (`aggregate`), so each algorithm picks
its normalisation explicitly. Functions that return a scalar loss return `(loss, stats)`, where stats are
detached floats-as-tensors for logging.

Shapes: B = completions, T = completion tokens. `mask` is 1 on tokens that count (up to and including EOS).
Log-probabilities are of softmax(logits / temperature), per token, float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.models.ops import masked_mean, masked_var

Stats = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence")
# ---------------------------------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: (B, T) -> (B, T).

    k1 = log pi - log ref (unbiased, can be negative), k2 = (log pi - log ref)^2 / 2 (biased, >= 0),
    k3 = ref/pi - 1 - log(ref/pi) (unbiased, >= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs  # log pi/ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # Clamp the exponent like everyone does: one token far off-policy must not give inf.
        neg = (-log_ratio).clamp(max=20.0)
        return neg.exp() - 1.0 - neg
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------
def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token",
              normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token:    sum over all tokens / number of tokens (or / `normalizer`, e.g. the token count of the whole
              batch when this call sees one micro-batch, so micro-batches add up to the exact batch loss);
    sequence: mean over each completion's tokens, then sum over completions / B (or / `normalizer`).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token":
        total = (per_token * mask).sum()
        return total / (mask.sum().clamp(min=1) if normalizer is None else normalizer)
    if mode == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return per_seq.sum() / (per_seq.numel() if normalizer is None else normalizer)
    raise ValueError(f"unknown aggregation {mode!r} (token, sequence)")


# ---------------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------------
def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token (to be minimised).

    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)), ratio = exp(logp - old_logp).
    advantages broadcast: (B, T) per token or (B, 1) per completion.
    Returns (per-token loss, ratio, clipped) where clipped marks tokens whose gradient the clip removed.
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped_obj = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped_obj), ratio, (clipped_obj > unclipped)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2, clip_high: float | None = None, agg: str = "token",
                normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """Clipped surrogate aggregated over the mask, with PPO's diagnostics.

    approx_kl = mean((logp - old)^2) / 2 (k2 of old -> new); clipfrac = fraction of tokens clipped.
    """
    per_tok, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip, clip_high)
    loss = aggregate(per_tok, mask, agg, normalizer)
    with torch.no_grad():
        d = logprobs - old_logprobs
        stats = {"approx_kl": masked_mean(0.5 * d.square(), mask), "clipfrac": masked_mean(clipped.float(), mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def sequence_policy_loss(seq_logprobs: torch.Tensor, old_seq_logprobs: torch.Tensor, advantages: torch.Tensor,
                         clip: float = 0.2, normalizer: float | None = None) -> tuple[torch.Tensor, Stats]:
    """Clipped surrogate on whole-sequence log-probabilities (RLOO as in TRL): (B,) -> scalar.

    With clip large (or one on-policy step, ratio == 1) the gradient is the REINFORCE one:
    -mean(A * grad sum_t log pi(y_t)).
    """
    loss_per_seq, ratio, clipped = clipped_surrogate(seq_logprobs, old_seq_logprobs, advantages, clip)
    loss = loss_per_seq.sum() / (loss_per_seq.numel() if normalizer is None else normalizer)
    with torch.no_grad():
        stats = {"clipfrac": clipped.float().mean(), "ratio_mean": ratio.mean(),
                 "approx_kl": (0.5 * (seq_logprobs - old_seq_logprobs).square()).mean()}
    return loss, stats


def reinforce_loss(seq_logprobs: torch.Tensor, advantages: torch.Tensor,
                   normalizer: float | None = None) -> torch.Tensor:
    """REINFORCE (Williams 1992): -mean(A * log pi(y)), y a whole completion: (B,) -> scalar.

    Its gradient is the score-function estimator -mean(A * grad sum_t log pi(y_t))."""
    total = -(advantages * seq_logprobs).sum()
    return total / (seq_logprobs.numel() if normalizer is None else normalizer)


# ---------------------------------------------------------------------------------------------------
# Value loss
# ---------------------------------------------------------------------------------------------------
def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, Stats]:
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clip(V - old).

    clip = 0 turns clipping off (plain 0.5 * (V - R)^2). Aggregated as a token mean.
    """
    err = (values - returns).square()
    if clip > 0:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns).square()
        per_tok = 0.5 * torch.maximum(err, err_clipped)
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    else:
        per_tok = 0.5 * err
        clipfrac = torch.zeros(())
    loss = aggregate(per_tok, mask, "token", normalizer)
    return loss, {"vf_clipfrac": clipfrac.detach()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens (1 = perfect critic, <= 0 = useless)."""
    var_r = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_r.clamp(min=1e-8)


# ---------------------------------------------------------------------------------------------------
# Offline preference losses
# ---------------------------------------------------------------------------------------------------
def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, kind: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, Stats]:
    """DPO / IPO on summed completion log-probabilities, (B,) each -> scalar.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h), with label smoothing eps (cDPO):
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h);
    ipo (Azar et al. 2023): (h - 1 / (2 beta))^2.
    The implicit rewards beta * (log pi - log ref) are returned as stats.
    """
    chosen_r = chosen_logps - ref_chosen_logps
    rejected_r = rejected_logps - ref_rejected_logps
    h = chosen_r - rejected_r
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).square()
    else:
        raise ValueError(f"unknown preference loss {kind!r} (sigmoid, ipo)")
    with torch.no_grad():
        stats = {"reward_chosen": (beta * chosen_r).mean(), "reward_rejected": (beta * rejected_r).mean(),
                 "margin": (beta * h).mean(), "accuracy": (h > 0).float().mean()}
    return losses.mean(), stats
