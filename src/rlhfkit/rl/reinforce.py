"""REINFORCE: `rlhfkit reinforce` (Williams 1992, as revisited for LMs by Ahmadian et al. 2024).

Each step: reward = score - beta * KL to the frozen initial policy (summed over the completion),
advantage = reward - the batch-mean reward (baseline "mean") or the reward itself ("none"), and one step on
-mean(A * log pi(completion)). No ratio, no clipping: every step is on-policy. The mean baseline leaves the
expected gradient unchanged up to a 1/B term (it includes the sample's own reward) and cuts variance;
RLOO (rl/rloo.py) is the same estimator with a per-prompt leave-one-out baseline, which removes that term.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhfkit.config import REINFORCEConfig
from rlhfkit.rl import driver
from rlhfkit.rl.advantages import normalize
from rlhfkit.rl.losses import reinforce_loss


def update(run: driver.RLRun, b: driver.Batch) -> dict[str, float]:
    cfg = run.cfg
    rewards, all_kl = run.sequence_rewards(b)  # (B,): score - beta * sequence KL
    advantages = rewards - rewards.mean() if cfg.baseline == "mean" else rewards
    if cfg.normalize_advantages:
        advantages = normalize(advantages)
    advantages = run.mine(advantages)

    def loss(seq_logprobs, adv):
        return reinforce_loss(seq_logprobs, adv, normalizer=run.B), {}

    stats = run.sequence_step(b, advantages, loss)
    del stats["ppo/clipfrac"]  # nothing is clipped
    return {**stats, "kl/mean": float(all_kl.mean())}


def train(cfg: REINFORCEConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run REINFORCE; returns the summary. `on_step(step, metrics)` is called after every step."""
    return driver.run(cfg, "reinforce", update, on_step=on_step)
