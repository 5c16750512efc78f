"""RLOO: `rlhfkit rloo` (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

Each step: G completions per prompt; reward = score - beta * sequence KL to the frozen initial policy (k1,
summed over the completion); advantage = reward - the mean reward of the *other* G - 1 completions of the
prompt; one step on a clipped surrogate of whole-sequence log-probabilities, mean over completions.
Defaults follow TRL's RLOOTrainer (1.16): beta 0.05, clip 0.2 on the sequence ratio, no normalisation.

Departures: the KL uses the rollout's sampling-time log-probabilities as log pi (TRL recomputes them with a
no-grad forward; equal to float rounding); the ratio's old log-probs are the current ones, detached (one
on-policy step: ratio exactly 1); prompts run once per group in the training and reference forwards.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhfkit.config import RLOOConfig
from rlhfkit.rl import driver
from rlhfkit.rl.advantages import group_advantages, normalize
from rlhfkit.rl.losses import sequence_policy_loss


def update(run: driver.RLRun, b: driver.Batch) -> dict[str, float]:
    cfg = run.cfg
    rewards, all_kl = run.sequence_rewards(b)  # (B,): score - beta * sequence KL
    advantages = group_advantages(rewards, run.G, "rloo")
    if cfg.normalize_advantages:
        advantages = normalize(advantages)
    advantages = run.mine(advantages)

    def loss(seq_logprobs, adv):  # the ratio's old log-probs: the same policy, detached (ratio 1)
        return sequence_policy_loss(seq_logprobs, seq_logprobs.detach(), adv, cfg.clip, normalizer=run.B)

    return {**run.sequence_step(b, advantages, loss), "kl/mean": float(all_kl.mean())}


def train(cfg: RLOOConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run RLOO; returns the summary. `on_step(step, metrics)` is called after every step."""
    return driver.run(cfg, "rloo", update, on_step=on_step)
