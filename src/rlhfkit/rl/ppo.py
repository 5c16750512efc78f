"""PPO for language models: `rlhfkit ppo` (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

Each step: sample completions; per-token reward = -beta * KL(policy || reference) on every token plus the
reward model's score on the last one; the critic (a ScalarHeadModel) gives a value before every token;
GAE turns rewards and values into advantages (whitened over the batch) and returns; then `epochs` passes
over the batch in `mini_batches` optimizer steps on the clipped policy loss + vf_coef * clipped value
loss (- entropy_coef * entropy). One AdamW updates actor and critic together.

Defaults follow TRL's PPOTrainer (1.12, the last TRL that has one): beta 0.05 with k1, gamma 1, lambda
0.95, clip 0.2, value clip 0.2, vf_coef 0.1, one epoch, one mini-batch, token-mean losses, whitened
advantages, unwhitened rewards, old log-probs from sampling time.

Departures, and why:
  * the score goes on the last token of the completion (its EOS if it has one). TRL puts it one position
    further when that position exists; with gamma 1 that only delays it by one lambda factor;
  * value loss and advantages use the completion's tokens (TRL's value mask reaches one token further);
  * old values: with one mini-batch (the whole batch, TRL's default) the critic's first training forward
    runs at the rollout's weights, so its values, detached, are the old values: no separate no-grad pass.
    With several mini-batches they come from a no-grad pass first. Old log-probs: the current ones,
    detached, until the first optimizer step on the rollout (ratio exactly 1), then the sampling-time ones;
  * each mini-batch runs the critic's passes, then the policy's: one network's activations at a time;
  * the gradient norm is clipped to optim.grad_clip (TRL's PPO loop does not clip);
  * with LoRA (model.lora_r > 0) policy and critic train adapters (the critic's head in full) and the
    reference is the policy with its adapters disabled.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.rl import driver
from rlhfkit.rl.advantages import gae, token_rewards, whiten
from rlhfkit.rl.losses import explained_variance, kl_penalty, policy_loss, value_loss


def update(run: driver.RLRun, b: driver.Batch) -> dict[str, float]:
    cfg, ro, mask, B = run.cfg, b.ro, b.mask, run.B
    n_rows, C = mask.shape  # this rank's rows and completion length

    # Per-token rewards: -beta * KL(sampling-time policy || reference) + the score on the last token
    # (multi-turn episodes: each step's reward on the last token of its turn).
    kl = torch.zeros_like(mask)
    if cfg.kl.coef:
        kl = kl_penalty(ro.logprobs, run.ref_logprobs(ro), cfg.kl.estimator) * mask
    if ro.step_rewards is None:
        rewards = token_rewards(b.scores, kl, mask, run.kl_ctl.value)
    else:  # multi-turn: each step's reward where it was earned; shaping (score - return) on the last token
        rewards = token_rewards(b.scores - ro.step_rewards.sum(-1), kl, mask, run.kl_ctl.value) + ro.step_rewards
    if cfg.whiten_rewards:  # over the global batch
        rewards = run.mine(whiten(run.gather(rewards)[0], b.all_mask, shift_mean=False), C)

    def advantages_from(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)  # per completion: this rank's rows
        return run.mine(whiten(run.gather(adv)[0], b.all_mask), C), ret

    # Old values from a no-grad pass, unless the first mini-batch is the whole batch (module docstring).
    old_values, advantages, returns = torch.zeros_like(mask), None, None
    if cfg.mini_batches > 1:
        with torch.no_grad():
            old_values = torch.cat([run.values(ro.rows(mb)) for mb in run.micro_batches(n_rows)])
        advantages, returns = advantages_from(old_values)

    n_updates, done = cfg.epochs * cfg.mini_batches, 0
    st = dict.fromkeys(("loss/policy", "loss/value", "ppo/approx_kl", "ppo/clipfrac", "value/clipfrac",
                        "policy/entropy"), 0.0)
    first = run.dist.shard(B).start  # global index of this rank's first row
    for epoch in range(cfg.epochs):
        # Mini-batches of global rows (the same permutation on every rank); one mini-batch: in order.
        perm = torch.randperm(B) if cfg.mini_batches > 1 else None
        for k in range(cfg.mini_batches):
            if perm is None:  # slices: groups share their prompt's pass
                micro, n_tok = run.micro_batches(n_rows, run.G), b.n_tokens
            else:
                gmini = perm[k * (B // cfg.mini_batches):(k + 1) * (B // cfg.mini_batches)]
                n_tok = float(b.all_mask[gmini].sum().clamp(min=1))
                mine = gmini[(gmini >= first) & (gmini < first + n_rows)] - first  # the rows this rank has
                micro = [mine[s] for s in run.micro_batches(len(mine))]
            loss_sum = 0.0
            # The critic's passes: value loss, clipped around the old values, toward the GAE returns.
            for rows in micro:
                m = mask[rows]
                values = run.values(ro.rows(rows))
                if advantages is None:  # first pass at the rollout's weights: these are the old values
                    old_values[rows] = values.detach()
                ret = returns[rows] if returns is not None else gae(rewards[rows], old_values[rows], m, cfg.gamma,
                                                                     cfg.lam)[1]
                vl, vst = value_loss(values, old_values[rows], ret, m, cfg.value_clip, normalizer=n_tok)
                (cfg.vf_coef * vl).backward()
                loss_sum += cfg.vf_coef * float(vl.detach())
                st["loss/value"] += float(vl.detach()) / n_updates
                st["value/clipfrac"] += float(vst["vf_clipfrac"] * m.sum()) / n_tok / n_updates
            if advantages is None:
                advantages, returns = advantages_from(old_values)
            # The policy's passes: clipped surrogate (- entropy bonus).
            for rows in micro:
                m = mask[rows]
                logprobs, entropy = run.logprobs(ro.rows(rows), with_entropy=True,
                                                 entropy_grad=cfg.entropy_coef > 0)
                old = logprobs.detach() if done == 0 else ro.logprobs[rows]
                pl, pst = policy_loss(logprobs, old, advantages[rows], m, cfg.clip, normalizer=n_tok)
                ent = (entropy * m).sum() / n_tok
                (pl - cfg.entropy_coef * ent).backward()
                loss_sum += float(pl.detach())
                w = float(m.sum()) / n_tok / n_updates  # this micro-batch's share of the averages
                st["loss/policy"] += float(pl.detach()) / n_updates
                st["policy/entropy"] += float(ent.detach()) / n_updates
                st["ppo/approx_kl"] += float(pst["approx_kl"]) * w
                st["ppo/clipfrac"] += float(pst["clipfrac"]) * w
            grad_norm = run.optimizer_step(loss_sum, b.step)
            done += 1

    st = {k: run.sum(v) for k, v in st.items()}  # every entry is this rank's share of a global mean
    all_values, all_returns = run.gather(old_values, returns)
    return {**st, "grad_norm": grad_norm, "kl/mean": run.sum(kl.sum()) / B,
            "value/mean": float((all_values * b.all_mask).sum() / b.all_mask.sum().clamp(min=1)),
            "value/explained_variance": float(explained_variance(all_values, all_returns, b.all_mask))}


def train(cfg: PPOConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run PPO; returns the summary. `on_step(step, metrics)` is called after every rollout's update."""
    detail = f"{cfg.epochs} epoch(s) x {cfg.mini_batches} mini-batch(es), "
    return driver.run(cfg, "ppo", update, detail=detail, critic=True, on_step=on_step)
