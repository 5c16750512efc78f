"""GRPO: `rlhfkit grpo` (Shao et al. 2024, DeepSeekMath).

Each step: sample G completions for each of U prompts, score them, turn rewards into group-relative
advantages A_i = (r_i - mean_group) / (std_group + 1e-4), and take one optimizer step on the clipped
surrogate (optionally several, `iterations`), with an optional per-token KL penalty to the frozen initial
policy added to the loss.

Defaults follow TRL's GRPOTrainer (1.16): token-level aggregation over the whole batch ("dapo"), beta 0
(no reference model), k3 KL estimator when beta > 0, clip 0.2, std scaling per group.

Departures, and why:
  * one on-policy iteration (the default) takes old log-probs = current ones, detached: the ratio is
    exactly 1 and no extra forward pass is spent on them (TRL does the same for GRPO);
  * with iterations > 1 the old log-probs are the sampling-time ones from the rollout (the same numbers
    up to float rounding) instead of a separate forward pass;
  * prompts are run once per group in the training forward (rollout.completion_logprobs);
  * with LoRA (model.lora_r > 0) the reference is the policy with its adapters disabled.

Several processes: each samples and trains on its share of the groups; advantages, the loss's token count
and the logged statistics are those of the global batch (rl/common.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from rlhfkit.config import GRPOConfig
from rlhfkit.data.datasets import EpochSampler
from rlhfkit.models.factory import count_params, get_tokenizer, lr_lambda, make_optimizer
from rlhfkit.models.reward import load_reward
from rlhfkit.rl.advantages import group_advantages
from rlhfkit.rl.common import (allocator_note, check_finite, clip_and_step, finish_run, global_rows, load_prompts,
                               micro_batches, mine, policy_and_reference, ref_cache_metrics, reference_logprobs,
                               rl_dist, rollout_scores, samples_table, should_stop, step_uniforms)
from rlhfkit.rl.kl import make_kl_controller
from rlhfkit.rl.losses import aggregate, clipped_surrogate, kl_penalty
from rlhfkit.rl.rollout import Sampler, SamplingParams, completion_logprobs
from rlhfkit.utils.checkpoint import (latest_checkpoint, load_trainer_state, load_weights_into, save_checkpoint)
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (GracefulStop, default_run_dir, peak_rss_mb, quiet_hf, seed_everything,
                                   set_threads, write_run_config)


def train(cfg: GRPOConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run GRPO; returns a summary dict. `on_step(step, metrics)` is called after every optimizer step."""
    t_start = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    dist, accel = rl_dist(cfg)
    device = dist.device
    run_dir = default_run_dir("grpo", cfg.log.run_dir)
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
    logger = MetricLogger(run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=step, desc="grpo",
                          is_main=dist.is_main)
    logger.write(f"grpo: {count_params(policy) / 1e6:.2f}M params ({sum(p.numel() for p in trainable) / 1e6:.2f}M "
                 f"trained), {len(prompts.ids)} prompts, {U} prompts x {G} samples per step, reward "
                 f"{cfg.reward.spec}, KL coef {kl_ctl.value}, {dist.world} process(es) on {device}{allocator_note(dist, accel)}"
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
            # 1. Rollout: U prompts in the seeded epoch order, G samples each; this rank samples its share.
            idx = [i for _, i in order.indices(pos, U)][dist.shard(U)]
            ro = sampler([prompts.ids[i] for i in idx], params, G, [prompts.texts[i] for i in idx],
                         step_uniforms(cfg.run.seed, step, B, params.max_new_tokens)[dist.shard(B)])
            t_gen = time.perf_counter() - t0

            # 2. Rewards -> group-relative advantages (B,) over the global batch. A NaN reward stops the run
            #    before any update.
            raw, scores = rollout_scores(reward_fn, ro, cfg.reward, device)
            all_raw, all_scores, all_lengths, all_finished = global_rows(dist, raw, scores, ro.lengths, ro.finished)
            check_finite("reward", all_raw, step + 1, run_dir)
            advantages = mine(dist, group_advantages(all_scores, G, "grpo", cfg.scale_rewards))
            mask = ro.completion_mask.float()
            n_tokens = max(dist.sum(mask.sum()), 1.0)  # the global batch's completion tokens
            ref_logprobs = None
            if cfg.kl.coef:
                ref_logprobs = reference_logprobs(policy, ref, ro, params.temperature, cfg.optim.batch_size,
                                                  accel.fast_decode)

            # 3. Policy update(s): the loss of every micro-batch is normalised by the whole batch, so their
            #    gradients add up to the gradient of the batch loss.
            stats: dict[str, float] = {"loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "entropy": 0.0, "kl": 0.0}
            b = len(ro.prompts)  # this rank's rows
            for it in range(cfg.iterations):
                it_loss = 0.0
                for mb in micro_batches(b, cfg.optim.batch_size, G):
                    part = ro.rows(mb)
                    logprobs, entropy = completion_logprobs(policy, part, params.temperature, with_entropy=it == 0)
                    old = logprobs.detach() if cfg.iterations == 1 else part.logprobs
                    per_token, _, clipped = clipped_surrogate(logprobs, old, advantages[mb, None], cfg.clip,
                                                              cfg.clip_high or cfg.clip)
                    m = mask[mb]
                    if ref_logprobs is not None:
                        kl = kl_penalty(logprobs, ref_logprobs[mb], cfg.kl.estimator)
                        per_token = per_token + kl_ctl.value * kl
                        stats["kl"] += float((kl.detach() * m).sum()) / B if it == 0 else 0.0
                    norm = n_tokens if cfg.loss_agg == "token" else B
                    loss = aggregate(per_token, m, cfg.loss_agg, normalizer=norm)
                    loss.backward()
                    it_loss += float(loss.detach())
                    stats["clipfrac"] += float((clipped.float() * m).sum()) / n_tokens / cfg.iterations
                    d = (logprobs.detach() - old) * m  # k2 of old -> current, as PPO logs it
                    stats["approx_kl"] += float((0.5 * d.square()).sum()) / n_tokens / cfg.iterations
                    if entropy is not None:
                        stats["entropy"] += float((entropy * m).sum()) / n_tokens
                it_loss = dist.sum(it_loss)  # every rank sees a NaN, so they stop together
                check_finite("loss", it_loss, step + 1, run_dir)
                stats["loss"] += it_loss / cfg.iterations
                dist.sum_gradients(trainable)  # per-rank losses are over global counts: the sum is the batch's
                grad_norm = clip_and_step(optimizer, trainable, cfg.optim.grad_clip or float("inf"), accel.on)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            stats.update({k: dist.sum(stats[k]) for k in ("clipfrac", "approx_kl", "entropy", "kl")})
            kl_ctl.update(stats["kl"], B)
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
                "ppo/approx_kl": stats["approx_kl"],
                "kl/mean": stats["kl"], "kl/coef": kl_ctl.value, "grad_norm": float(grad_norm),
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
