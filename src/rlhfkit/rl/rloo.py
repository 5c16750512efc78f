"""RLOO: `rlhfkit rloo` (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

Each step: sample G completions for each of U prompts; the reward of a completion is its score minus
beta * its KL to the frozen initial policy (k1, summed over the completion); its advantage is that reward
minus the mean reward of the *other* G - 1 completions of its prompt. The loss is a clipped surrogate on
whole-sequence log-probabilities, averaged over completions.

Defaults follow TRL's RLOOTrainer (1.16): beta 0.05, k1 sequence KL in the reward, clip 0.2 on the sequence
ratio, no advantage normalisation.

Departures, and why:
  * the KL term uses the sampling-time log-probabilities of the rollout as log pi_old (TRL recomputes
    them with an extra no-grad forward pass; the numbers agree to float rounding);
  * the ratio's old log-probs are the current ones, detached (one on-policy step: ratio exactly 1);
  * prompts are run once per group in the training and reference forwards.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from rlhfkit.config import RLOOConfig
from rlhfkit.data.datasets import EpochSampler
from rlhfkit.models.factory import count_params, get_tokenizer, lr_lambda, make_optimizer
from rlhfkit.models.reward import load_reward
from rlhfkit.rl.advantages import group_advantages, normalize
from rlhfkit.rl.common import (allocator_note, check_finite, clip_and_step, finish_run, load_prompts, micro_batches,
                               mine, policy_and_reference, ref_cache_metrics, rl_dist, samples_table, sequence_rewards,
                               should_stop, step_uniforms)
from rlhfkit.rl.kl import make_kl_controller
from rlhfkit.rl.losses import sequence_policy_loss
from rlhfkit.rl.rollout import Sampler, SamplingParams, completion_logprobs
from rlhfkit.utils.checkpoint import (latest_checkpoint, load_trainer_state, load_weights_into, save_checkpoint)
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (GracefulStop, default_run_dir, peak_rss_mb, quiet_hf, seed_everything,
                                   set_threads, write_run_config)


def train(cfg: RLOOConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run RLOO; returns a summary dict. `on_step(step, metrics)` is called after every optimizer step."""
    t_start = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    dist, accel = rl_dist(cfg)
    device = dist.device
    run_dir = default_run_dir("rloo", cfg.log.run_dir)
    if dist.is_main:
        write_run_config(run_dir, cfg)
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None

    tok = get_tokenizer(cfg.tokenizer, cfg.model.name_or_path)
    prompts = load_prompts(cfg.data, tok)
    reward_fn = load_reward(cfg.reward.spec, device)
    U, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    B = U * G
    params = SamplingParams.from_config(cfg.rollout)
    order = EpochSampler(len(prompts.ids), cfg.run.seed)

    seed_everything(cfg.run.seed)
    policy, ref = policy_and_reference(cfg.model, cfg.kl.coef, device, accel)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(policy, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim))
    kl_ctl = make_kl_controller(cfg.kl)
    step, pos = 0, 0
    if ckpt is not None:
        load_weights_into(policy, ckpt / "model")
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl"])
        step, pos = state["step"], state["pos"]
    dist.broadcast_from_main(trainable)  # every rank starts from rank 0's weights

    sampler = Sampler(policy, tok, accel.backend(cfg.rollout.backend), cfg.model.name_or_path, cfg.run.seed,
                      accel.replay_mb)
    logger = MetricLogger(run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=step, desc="rloo",
                          is_main=dist.is_main)
    logger.write(f"rloo: {count_params(policy) / 1e6:.2f}M params, {len(prompts.ids)} prompts, {U} prompts x "
                 f"{G} samples per step, reward {cfg.reward.spec}, KL coef {kl_ctl.value}, {dist.world} process(es) on {device}{allocator_note(dist, accel)}"
                 + (f"; resumed from {ckpt} at step {step}" if ckpt else ""))
    saved_step, history = step, []

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if dist.is_main:
            save_checkpoint(run_dir, step, models={"model": policy}, tokenizer=tok, keep=cfg.log.keep_checkpoints,
                            state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "kl": kl_ctl.state_dict(), "pos": pos})
        dist.barrier()

    with GracefulStop() as stop, logger:
        while step < cfg.optim.max_steps:
            t0 = time.perf_counter()
            # 1. Rollout.
            idx = [i for _, i in order.indices(pos, U)][dist.shard(U)]  # this rank's share of the prompts
            ro = sampler([prompts.ids[i] for i in idx], params, G, [prompts.texts[i] for i in idx],
                         step_uniforms(cfg.run.seed, step, B, params.max_new_tokens)[dist.shard(B)])
            t_gen = time.perf_counter() - t0
            mask = ro.completion_mask.float()

            # 2. Rewards: score - beta * sequence KL to the reference (global batch), then the leave-one-out baseline; baselines
            #    and normalisation over the global batch too, this rank keeping its rows.
            raw, all_raw, all_scores, all_kl, all_lengths, all_finished, rewards = sequence_rewards(
                dist, reward_fn, ro, cfg, policy, ref, params.temperature, kl_ctl.value, step + 1, run_dir, accel.fast_decode)
            advantages = group_advantages(rewards, G, "rloo")
            if cfg.normalize_advantages:
                advantages = normalize(advantages)
            advantages = mine(dist, advantages)

            # 3. One policy step on the sequence-level clipped surrogate, mean over completions.
            stats = {"loss": 0.0, "clipfrac": 0.0, "entropy": 0.0}
            n_tokens = max(dist.sum(mask.sum()), 1.0)  # the global batch's
            for mb in micro_batches(len(ro.prompts), cfg.optim.batch_size, G):
                logprobs, entropy = completion_logprobs(policy, ro.rows(mb), params.temperature, with_entropy=True)
                seq_logprobs = logprobs.sum(-1)  # (b,), already masked
                loss, st = sequence_policy_loss(seq_logprobs, seq_logprobs.detach(), advantages[mb], cfg.clip,
                                                normalizer=B)
                loss.backward()
                stats["loss"] += float(loss.detach())
                stats["clipfrac"] += float(st["clipfrac"]) * (mb.stop - mb.start) / B  # share of the global B
                stats["entropy"] += float((entropy * mask[mb]).sum()) / n_tokens
            stats = {k: dist.sum(v) for k, v in stats.items()}  # each rank's share of the batch means
            check_finite("loss", stats["loss"], step + 1, run_dir)
            dist.sum_gradients(trainable)  # the losses are over the global B: the sum is the batch's gradient
            grad_norm = clip_and_step(optimizer, trainable, cfg.optim.grad_clip or float("inf"), accel.on)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            kl_ctl.update(float(all_kl.mean()), B)
            step += 1
            pos += U

            # 4. Log.
            dt = time.perf_counter() - t0
            n_gen = int(all_lengths.sum())
            metrics = {
                "rollout/reward_mean": float(all_raw.mean()), "rollout/reward_std": float(all_raw.std()),
                "rollout/score_mean": float(all_scores.mean()),
                "rollout/length_mean": float(all_lengths.float().mean()),
                "rollout/finished_frac": float(all_finished.float().mean()), "rollout/tokens": n_gen,
                "loss/policy": stats["loss"], "policy/entropy": stats["entropy"], "ppo/clipfrac": stats["clipfrac"],
                "kl/mean": float(all_kl.mean()), "kl/coef": kl_ctl.value, "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0], "perf/s_per_step": dt, "perf/gen_s": t_gen,
                "perf/tokens_per_s": n_gen / dt, "perf/samples_per_s": B / dt, "perf/peak_rss_mb": peak_rss_mb(),
                **ref_cache_metrics(ref),
            }
            history.append(metrics["rollout/reward_mean"])
            logger.advance(1, reward=metrics["rollout/reward_mean"])
            if step % cfg.log.log_every == 0 or step == cfg.optim.max_steps:
                logger.log(metrics, step)
            if (cfg.log.eval_every and step % cfg.log.eval_every == 0) or step == cfg.optim.max_steps:
                logger.log_text("samples", samples_table(ro.prompts, ro.completions, raw), step)
            if on_step is not None:
                on_step(step, metrics)
            halt = should_stop(dist, stop, t_start, cfg.run.max_minutes)  # Ctrl-C, SIGTERM, time limit
            if (cfg.log.save_every and step % cfg.log.save_every == 0) or halt:
                checkpoint()
            if halt:
                break
        if saved_step != step:
            checkpoint()

    return finish_run(dist, run_dir, policy, tok, logger, step, history, kl_ctl.value, t_start)
