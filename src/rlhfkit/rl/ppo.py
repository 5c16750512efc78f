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
    further when that position exists (its `sequence_lengths_p1`); with gamma 1 that only delays it by one
    lambda factor, and completions cut at max_new_tokens (most, early in training) are treated the same;
  * value loss and advantages use the completion's tokens (TRL's value mask reaches one token further);
  * one epoch of one mini-batch (the default) needs the rollout's values and log-probs only through the
    training forward itself: the critic's training pass runs first and its values, detached, are the
    rollout values; the ratio's old log-probs are the current ones detached (ratio exactly 1). That is
    exact, saves the critic's separate no-grad pass, and keeps only one network's activations in memory at
    a time. With more epochs or mini-batches the old values come from a no-grad pass and the old log-probs
    from sampling time, as in TRL;
  * the gradient norm is clipped to optim.grad_clip (TRL's PPO loop does not clip);
  * with LoRA (model.lora_r > 0) policy and critic train adapters (the critic's head in full) and the
    reference is the policy with its adapters disabled.

Several processes: each samples, scores and trains on its share of the rollout; whitening, the loss's token
counts, the mini-batches (a global permutation of rows) and the logged statistics are the global batch's
(rl/common.py), so the updates are those of one process.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from rlhfkit.config import PPOConfig
from rlhfkit.data.datasets import EpochSampler
from rlhfkit.models.factory import (apply_lora, count_params, decay_param_groups, enable_gradient_checkpointing,
                                    get_tokenizer, lr_lambda, make_optimizer)
from rlhfkit.models.heads import ScalarHeadModel
from rlhfkit.models.reward import load_reward
from rlhfkit.rl.advantages import gae, token_rewards, whiten
from rlhfkit.rl.common import (allocator_note, check_finite, clip_and_step, finish_run, global_rows, load_policy,
                               load_prompts, micro_batches, mine, policy_and_reference, ref_cache_metrics,
                               reference_logprobs, rl_dist, rollout_scores, samples_table, should_stop, step_uniforms,
                               use_fast_activations)
from rlhfkit.rl.kl import make_kl_controller
from rlhfkit.rl.losses import explained_variance, kl_penalty, policy_loss, value_loss
from rlhfkit.rl.rollout import Sampler, SamplingParams, completion_logprobs, completion_values
from rlhfkit.utils.checkpoint import (latest_checkpoint, load_trainer_state, load_weights_into, save_checkpoint)
from rlhfkit.utils import weights
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (GracefulStop, default_run_dir, peak_rss_mb, quiet_hf, seed_everything,
                                   set_threads, write_run_config)


def load_critic(cfg: PPOConfig, device: torch.device, path: str = "", fast: bool = True) -> ScalarHeadModel:
    """The critic: a saved ScalarHeadModel (`path` or cfg.critic), else the policy's backbone + a zero head.
    With LoRA its backbone gets adapters too (the head trains in full); a LoRA run resumes them from the
    trainer state, so `path` is only for full critics."""
    path = path or cfg.critic
    if path:
        critic = ScalarHeadModel.from_pretrained(path)
    else:
        critic = ScalarHeadModel.from_causal_lm(load_policy(cfg.model.name_or_path, cfg.model.dtype, device,
                                                            fast=fast))
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(critic.backbone)
    if cfg.model.lora_r:
        critic.backbone = apply_lora(critic.backbone, cfg.model, causal_lm=False)
    return (use_fast_activations(critic) if fast else critic).to(device).train()


def train(cfg: PPOConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Run PPO; returns a summary dict. `on_step(step, metrics)` is called after every rollout's update."""
    t_start = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    dist, accel = rl_dist(cfg)
    device = dist.device
    run_dir = default_run_dir("ppo", cfg.log.run_dir)
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
    lora = bool(cfg.model.lora_r)
    policy, ref = policy_and_reference(cfg.model, cfg.kl.coef, device, accel)
    critic = load_critic(cfg, device, str(ckpt / "critic") if ckpt and not lora else "", accel.fast_decode)
    trainable = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
    wd = cfg.optim.weight_decay
    optimizer = make_optimizer(decay_param_groups(policy, wd) + decay_param_groups(critic, wd), cfg.optim)
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
        if lora:  # the critic's adapters and head
            critic.load_state_dict(state["critic"], strict=False)
            weights.changed()
    dist.broadcast_from_main(trainable)  # every rank starts from rank 0's weights
    single_update = cfg.epochs == 1 and cfg.mini_batches == 1  # TRL's default: one optimizer step per rollout

    sampler = Sampler(policy, tok, accel.backend(cfg.rollout.backend), cfg.model.name_or_path, cfg.run.seed,
                      accel.replay_mb)
    logger = MetricLogger(run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=step, desc="ppo",
                          is_main=dist.is_main)
    logger.write(f"ppo: {count_params(policy) / 1e6:.2f}M policy + {count_params(critic) / 1e6:.2f}M critic params, "
                 f"{len(prompts.ids)} prompts, {B} completions per rollout, {cfg.epochs} epoch(s) x "
                 f"{cfg.mini_batches} mini-batch(es), reward {cfg.reward.spec}, KL coef {kl_ctl.value}, "
                 f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained params, {dist.world} process(es) on {device}{allocator_note(dist, accel)}" + (f"; resumed from {ckpt} at step {step}" if ckpt else ""))
    saved_step, history = step, []

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        if dist.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "kl": kl_ctl.state_dict(), "pos": pos}
            if lora:  # adapters + head only; the base is rebuilt from model.name_or_path
                names = {n for n, p in critic.named_parameters() if p.requires_grad}
                state["critic"] = {k: v for k, v in critic.state_dict().items() if k in names}
            models = {"model": policy} if lora else {"model": policy, "critic": critic}
            save_checkpoint(run_dir, step, models=models, tokenizer=tok, keep=cfg.log.keep_checkpoints, state=state)
        dist.barrier()

    with GracefulStop() as stop, logger:
        while step < cfg.optim.max_steps:
            t0 = time.perf_counter()
            # 1. Rollout and scores.
            # This rank samples its share of the prompts (rows dist.shard(B) of the global batch).
            idx = [i for _, i in order.indices(pos, U)][dist.shard(U)]
            ro = sampler([prompts.ids[i] for i in idx], params, G, [prompts.texts[i] for i in idx],
                         step_uniforms(cfg.run.seed, step, B, params.max_new_tokens)[dist.shard(B)])
            t_gen = time.perf_counter() - t0
            mask = ro.completion_mask.float()
            b, C = mask.shape  # this rank's rows and completion length
            raw, scores = rollout_scores(reward_fn, ro, cfg.reward, device)
            all_raw, all_scores, all_lengths, all_finished, all_mask = global_rows(
                dist, raw, scores, ro.lengths, ro.finished, mask)
            check_finite("reward", all_raw, step + 1, run_dir)

            # 2. Per-token rewards: -beta * KL(sampling-time policy || reference) + score on the last token.
            kl = torch.zeros_like(mask)
            if cfg.kl.coef:
                ref_logprobs = reference_logprobs(policy, ref, ro, params.temperature, cfg.optim.batch_size,
                                                  accel.fast_decode)
                kl = kl_penalty(ro.logprobs, ref_logprobs, cfg.kl.estimator) * mask
            rewards = token_rewards(scores, kl, mask, kl_ctl.value)
            if cfg.whiten_rewards:  # over the global batch
                rewards = mine(dist, whiten(dist.gather_rows(rewards), all_mask, shift_mean=False), C)

            def advantages_from(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)  # per completion: this rank's rows
                return mine(dist, whiten(dist.gather_rows(adv), all_mask), C), ret

            # 3. Updates. Losses are token means over the mini-batch, split over micro-batches exactly.
            acc = {k: 0.0 for k in ("loss/policy", "loss/value", "ppo/approx_kl", "ppo/clipfrac", "value/clipfrac",
                                    "policy/entropy")}
            bs = cfg.optim.batch_size
            if single_update:
                # One optimizer step from the rollout's own weights. Critic first: its training forward is
                # also the rollout's value pass (values detached = old values); returns are per completion, so
                # each micro-batch's value loss is complete at once. Then the policy, whose advantages are
                # whitened over the whole batch. The gradients are those of the joint loss (the two networks
                # share no parameters), with no separate value pass and one network's activations alive at a time.
                n_tok = float(all_mask.sum().clamp(min=1))  # tokens of the global batch
                old_values = torch.zeros_like(mask)
                for mic in micro_batches(b, bs):
                    m = mask[mic]
                    values = completion_values(critic, ro.rows(mic), accel.fast_decode)
                    old_values[mic] = values.detach()
                    returns_mic = gae(rewards[mic], old_values[mic], m, cfg.gamma, cfg.lam)[1]
                    vl, vst = value_loss(values, old_values[mic], returns_mic, m, cfg.value_clip, normalizer=n_tok)
                    (cfg.vf_coef * vl).backward()
                    acc["loss/value"] += float(vl.detach())
                    acc["value/clipfrac"] += float(vst["vf_clipfrac"] * m.sum() / n_tok)
                advantages, returns = advantages_from(old_values)
                for mic in micro_batches(b, bs, G):
                    m = mask[mic]
                    logprobs, entropy = completion_logprobs(policy, ro.rows(mic), params.temperature,
                                                            with_entropy=True, entropy_grad=cfg.entropy_coef > 0)
                    pl, pst = policy_loss(logprobs, logprobs.detach(), advantages[mic], m, cfg.clip, normalizer=n_tok)
                    ent = (entropy * m).sum() / n_tok
                    loss = pl - cfg.entropy_coef * ent
                    loss.backward()
                    acc["loss/policy"] += float(pl.detach())
                    acc["policy/entropy"] += float(ent.detach())
                    acc["ppo/clipfrac"] += float(pst["clipfrac"] * m.sum() / n_tok)
                # Every rank sees a NaN loss (so they stop together); the losses are over global token counts,
                # so the summed gradients are the whole batch's.
                check_finite("loss", dist.sum(acc["loss/policy"] + acc["loss/value"]), step + 1, run_dir)
                dist.sum_gradients(trainable)
                grad_norm = clip_and_step(optimizer, trainable, cfg.optim.grad_clip or float("inf"), accel.on)
                optimizer.zero_grad(set_to_none=True)
            else:
                # Several updates per rollout: the old values come from a no-grad pass and the old log-probs
                # from sampling time, fixed for every epoch and mini-batch (as in TRL).
                with torch.no_grad():
                    old_values = torch.cat([completion_values(critic, ro.rows(mb), accel.fast_decode) for mb in micro_batches(b, bs)])
                advantages, returns = advantages_from(old_values)
                n_updates = cfg.epochs * cfg.mini_batches
                mb_size = B // cfg.mini_batches
                first = dist.shard(B).start  # global index of this rank's first row
                for epoch in range(cfg.epochs):
                    perm = torch.randperm(B)  # mini-batches of global rows: the same on every rank
                    for k in range(cfg.mini_batches):
                        gmini = perm[k * mb_size:(k + 1) * mb_size]
                        n_tok = all_mask[gmini].sum().clamp(min=1)
                        mini = gmini[(gmini >= first) & (gmini < first + b)] - first  # the rows this rank has
                        for mic in micro_batches(len(mini), bs):
                            rows = mini[mic]
                            part, m = ro.rows(rows), mask[rows]
                            logprobs, entropy = completion_logprobs(policy, part, params.temperature,
                                                                    with_entropy=True, entropy_grad=cfg.entropy_coef > 0)
                            values = completion_values(critic, part, accel.fast_decode)
                            pl, pst = policy_loss(logprobs, ro.logprobs[rows], advantages[rows], m, cfg.clip,
                                                  normalizer=n_tok)
                            vl, vst = value_loss(values, old_values[rows], returns[rows], m, cfg.value_clip,
                                                 normalizer=n_tok)
                            ent = (entropy * m).sum() / n_tok
                            loss = pl + cfg.vf_coef * vl - cfg.entropy_coef * ent
                            loss.backward()
                            w = float(m.sum() / n_tok) / n_updates  # this micro-batch's share of the averages
                            acc["loss/policy"] += float(pl.detach()) / n_updates
                            acc["loss/value"] += float(vl.detach()) / n_updates
                            acc["policy/entropy"] += float(ent.detach()) / n_updates
                            acc["ppo/approx_kl"] += float(pst["approx_kl"]) * w
                            acc["ppo/clipfrac"] += float(pst["clipfrac"]) * w
                            acc["value/clipfrac"] += float(vst["vf_clipfrac"]) * w
                        check_finite("loss", dist.sum(acc["loss/policy"] + acc["loss/value"]), step + 1, run_dir)
                        dist.sum_gradients(trainable)
                        grad_norm = clip_and_step(optimizer, trainable, cfg.optim.grad_clip or float("inf"), accel.on)
                        optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            acc = {k: dist.sum(v) for k, v in acc.items()}  # every entry is this rank's share of a global mean
            seq_kl = dist.sum(kl.sum()) / B
            kl_ctl.update(seq_kl, B)
            step += 1
            pos += U

            # 4. Log.
            dt = time.perf_counter() - t0
            n_gen = int(all_lengths.sum())
            all_values, all_returns = global_rows(dist, old_values, returns)
            metrics = {
                "rollout/reward_mean": float(all_raw.mean()), "rollout/reward_std": float(all_raw.std()),
                "rollout/score_mean": float(all_scores.mean()),
                "rollout/length_mean": float(all_lengths.float().mean()),
                "rollout/finished_frac": float(all_finished.float().mean()), "rollout/tokens": n_gen, **acc,
                "value/mean": float((all_values * all_mask).sum() / all_mask.sum().clamp(min=1)),
                "value/explained_variance": float(explained_variance(all_values, all_returns, all_mask)),
                "kl/mean": seq_kl, "kl/coef": kl_ctl.value, "grad_norm": float(grad_norm),
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

    def save_critic() -> None:
        if lora:  # a plain ScalarHeadModel on disk, like a full critic's
            critic.backbone = critic.backbone.merge_and_unload()
            weights.changed()
        critic.save_pretrained(run_dir / "final_critic")

    return finish_run(dist, run_dir, policy, tok, logger, step, history, kl_ctl.value, t_start,
                      save_more=save_critic, final_critic=str(run_dir / "final_critic"))
