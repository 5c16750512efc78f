"""GRPO: `rlhfkit grpo` (Shao et al. 2024, DeepSeekMath).

Each step: G completions for each of U prompts, group-relative advantages A_i = (r_i - mean_group) /
(std_group + 1e-4), and `iterations` optimizer steps on the clipped surrogate, with an optional per-token
KL penalty to the frozen initial policy in the loss. Defaults follow TRL's GRPOTrainer (1.16): token-level
aggregation over the batch ("dapo"), beta 0 (no reference model), k3 when beta > 0, clip 0.2.

Departures: the first iteration takes old log-probs = the current ones, detached (ratio exactly 1, no
extra forward; TRL does the same), later ones the sampling-time ones; with LoRA the reference is the
policy with its adapters disabled; the schedule steps once per rollout, not per iteration.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhfkit.config import GRPOConfig
from rlhfkit.rl import driver
from rlhfkit.rl.advantages import group_advantages
from rlhfkit.rl.losses import aggregate, clipped_surrogate, kl_penalty


def update(run: driver.RLRun, b: driver.Batch) -> dict[str, float]:
    cfg, ro, B = run.cfg, b.ro, run.B
    advantages = run.mine(group_advantages(b.all_scores, run.G, "grpo", cfg.scale_rewards))  # (b,)
    ref_logprobs = run.ref_logprobs(ro) if cfg.kl.coef else None
    norm = b.n_tokens if cfg.loss_agg == "token" else B  # every micro-batch's loss is over the global batch
    st = dict.fromkeys(("loss/policy", "ppo/clipfrac", "ppo/approx_kl", "policy/entropy", "kl/mean"), 0.0)
    for it in range(cfg.iterations):
        it_loss = 0.0
        for mb in run.micro_batches(len(ro.prompts), run.G):
            part, m = ro.rows(mb), b.mask[mb]
            logprobs, entropy = run.logprobs(part, with_entropy=it == 0)
            old = logprobs.detach() if it == 0 else part.logprobs  # no update made yet: the same policy
            per_token, _, clipped = clipped_surrogate(logprobs, old, advantages[mb, None], cfg.clip,
                                                      cfg.clip_high or cfg.clip)
            if ref_logprobs is not None:
                kl = kl_penalty(logprobs, ref_logprobs[mb], cfg.kl.estimator)
                per_token = per_token + run.kl_ctl.value * kl
                st["kl/mean"] += float((kl.detach() * m).sum()) / B if it == 0 else 0.0
            loss = aggregate(per_token, m, cfg.loss_agg, normalizer=norm)
            loss.backward()
            it_loss += float(loss.detach())
            d = (logprobs.detach() - old) * m  # k2 of old -> current, as PPO logs it
            st["ppo/approx_kl"] += float((0.5 * d.square()).sum()) / b.n_tokens / cfg.iterations
            st["ppo/clipfrac"] += float((clipped.float() * m).sum()) / b.n_tokens / cfg.iterations
            if entropy is not None:
                st["policy/entropy"] += float((entropy * m).sum()) / b.n_tokens
        st["grad_norm"] = run.optimizer_step(it_loss, b.step)
        st["loss/policy"] += run.sum(it_loss) / cfg.iterations
    return {k: v if k in ("loss/policy", "grad_norm") else run.sum(v) for k, v in st.items()}


def train(cfg: GRPOConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run GRPO; returns the summary. `on_step(step, metrics)` is called after every step."""
    return driver.run(cfg, "grpo", update, on_step=on_step)
