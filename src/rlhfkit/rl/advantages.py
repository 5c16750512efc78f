"""Rewards to advantages: reward shaping, discounted returns, GAE, whitening, group baselines.

Pure functions on tensors. B = completions, T = completion tokens; `mask` (B, T) is 1 on the tokens of
each completion (up to and including EOS). Per-completion rewards are (B,); per-token ones (B, T).
"""
from __future__ import annotations

import torch

from rlhfkit.models.ops import masked_mean, masked_var


# ---------------------------------------------------------------------------------------------------
# Reward shaping
# ---------------------------------------------------------------------------------------------------
def shape_scores(scores: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor,
                 missing_eos_penalty: float = 0.0, length_penalty: float = 0.0) -> torch.Tensor:
    """Per-completion penalties: `missing_eos_penalty` if the completion did not stop by itself
    (finished False: it ran into max_new_tokens), and `length_penalty` per token. (B,) -> (B,)."""
    out = scores - missing_eos_penalty * (~finished.bool()).to(scores.dtype)
    return out - length_penalty * lengths.to(scores.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a mask (0 for an empty row): (B, T) -> (B,). The mask may have
    holes (a multi-turn episode's environment tokens)."""
    at = torch.arange(1, mask.size(-1) + 1, device=mask.device)
    return ((mask != 0).long() * at).amax(-1).sub(1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards for PPO: -kl_coef * kl on every token, plus the score on the last token.

    scores (B,), kl (B, T) -> (B, T), zero outside the mask.
    """
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.size(0), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards


# ---------------------------------------------------------------------------------------------------
# Returns and GAE
# ---------------------------------------------------------------------------------------------------
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1}, with the return 0 after the end of each completion. (B, T) -> (B, T)."""
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). Returns (advantages, returns), (B, T) each.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where V and A after the
    last token of a completion are 0 (the episode ends there). returns = advantages + values (the critic's
    regression target). Zero outside the mask.

    Positions outside the mask are skipped, not treated as ends: in a multi-turn episode the environment's
    tokens sit between policy turns, and the recursion runs over the policy's tokens only (the next value
    of a turn's last token is the value before the next turn's first token). For a right-padded mask this
    is the same as ending the episode at its last token.
    """
    on = mask != 0
    mask = mask.to(rewards.dtype)
    values = values * mask
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mask[:, t]
        next_adv = torch.where(on[:, t], a, next_adv)
        next_value = torch.where(on[:, t], values[:, t], next_value)
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (unbiased variance); with shift_mean False the
    mean is added back (only the scale changes). Zero outside the mask."""
    if mask is None:
        mask = torch.ones_like(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Baselines over groups of completions of the same prompt
# ---------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "grpo", scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages of (B,) rewards where rows g*G .. g*G+G-1 are completions of one prompt. (B,) -> (B,).

    grpo: A_i = (r_i - mean of its group) / (std + eps), std the unbiased std of the group (scale=group),
          of the whole batch (scale=batch), or no division (scale=none, Dr. GRPO);
    rloo: A_i = r_i - mean of the *other* G-1 rewards of its group (Kool et al. 2019, Ahmadian et al. 2024),
          = G/(G-1) * (r_i - group mean).
    """
    G = group_size
    if rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {G}")
    r = rewards.view(-1, G)  # (B/G, G)
    if kind == "rloo":
        if G < 2:
            raise ValueError("the leave-one-out baseline needs groups of at least 2")
        baseline = (r.sum(1, keepdim=True) - r) / (G - 1)
        return (r - baseline).view(-1)
    if kind != "grpo":
        raise ValueError(f"unknown group baseline {kind!r} (grpo, rloo)")
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scaling {scale!r} (group, batch, none)")
    return adv.reshape(-1)


def normalize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(x - mean) / (std + eps) over a (B,) batch (unbiased std)."""
    return (x - x.mean()) / (x.std() + eps)
