"""The one driver of the RL stages: everything around an algorithm's update, written once.

    def train(cfg): return driver.run(cfg, "grpo", update)          # rl/grpo.py
    def update(run: RLRun, batch: Batch) -> dict: ...               # its rollout -> update block

`run` builds the processes, the accelerated path's parts (rlhfkit.accel, from run.accel), tokenizer,
the environment (env.name; else the prompts and reward as a single-turn one: rlhfkit.envs), policy and
reference (and PPO's critic), optimizer and schedule, KL controller and sampler; resumes from the newest
checkpoint; then each step runs this rank's share of the step's episodes through the environment (one
batched sampling + one batched score for a single-turn environment; turn by turn for a multi-turn one; a
NaN reward stops the run before any update), calls the algorithm's `update`,
steps the schedule and the KL controller, logs, calls `on_step`, checkpoints and stops on Ctrl-C,
SIGTERM or the time limit; at the end it saves final/ (and final_critic/) and summary.json.

`update` sees only RLRun's plain interface: `logprobs`, `ref_logprobs`, `values` (each through the
accelerated parts that are on, or HF's forward), `micro_batches`, `gather` / `mine` (global rows, see
rl/common.py), `optimizer_step`. Which path runs is chosen once, at setup, and logged in the header.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.data.datasets import EpochSampler
from rlhfkit.envs.rollout import EnvRunner, Episodes
from rlhfkit.models.factory import (
    apply_lora,
    count_params,
    decay_param_groups,
    enable_gradient_checkpointing,
    get_tokenizer,
    lr_lambda,
    make_optimizer,
)
from rlhfkit.models.reward import load_reward
from rlhfkit.rl.advantages import shape_scores
from rlhfkit.rl.common import (
    check_finite,
    finish_run,
    global_rows,
    load_policy,
    load_prompts,
    micro_batches,
    mine,
    policy_and_reference,
    reference_logprobs,
    rl_dist,
    run_note,
    samples_table,
    step_uniforms,
)
from rlhfkit.rl.kl import make_kl_controller
from rlhfkit.rl.rollout import Rollout, Sampler, SamplingParams
from rlhfkit.utils import weights
from rlhfkit.utils.checkpoint import latest_checkpoint, load_trainer_state, load_weights_into, save_checkpoint
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (
    GracefulStop,
    default_run_dir,
    peak_rss_mb,
    quiet_hf,
    seed_everything,
    set_threads,
    should_stop,
    write_run_config,
)


@dataclass
class Batch:
    """One step's rollout and scores: this rank's rows, and the global batch's where named all_*."""
    ro: Rollout
    mask: torch.Tensor          # (b, C) 1.0 on completion tokens that count
    raw: torch.Tensor           # (b,) the reward function's scores
    scores: torch.Tensor        # (b,) after EOS / length shaping: what is optimised
    all_raw: torch.Tensor       # (B,)
    all_scores: torch.Tensor    # (B,)
    all_lengths: torch.Tensor   # (B,)
    all_finished: torch.Tensor  # (B,)
    all_mask: torch.Tensor      # (B, C') every rank's masks (padded to the longest)
    n_tokens: float             # completion tokens of the global batch (>= 1)
    step: int                   # the step this batch trains (1-based)
    env_metrics: dict[str, float] = field(default_factory=dict)  # env/* of the global batch (env.name runs)


class RLRun:
    """What an algorithm's update works with (see the module docstring); built by `setup`."""

    def __init__(self, cfg: Any, name: str, critic: bool) -> None:
        self.cfg, self.name, self.t_start = cfg, name, time.time()
        self.t_ref = 0.0  # seconds in the reference's forward this step (perf/ref_s)
        set_threads(cfg.run.threads)
        quiet_hf()
        self.dist, self.accel = rl_dist(cfg)
        self.device = self.dist.device
        self.run_dir = default_run_dir(name, cfg.log.run_dir)
        if self.dist.is_main:
            write_run_config(self.run_dir, cfg)
        ckpt = latest_checkpoint(self.run_dir) if cfg.run.resume else None

        self.tok = get_tokenizer(cfg.tokenizer, cfg.model.name_or_path)
        self.env = self._environment()
        self.U, self.G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
        self.B = self.U * self.G
        self.params = SamplingParams.from_config(cfg.rollout)
        self.order = EpochSampler(self.n_problems, cfg.run.seed) if self.n_problems else None

        seed_everything(cfg.run.seed)
        self.lora = bool(cfg.model.lora_r)
        self.policy, self.ref = policy_and_reference(cfg.model, cfg.kl.coef, self.device, self.accel)
        self.critic = self._critic(ckpt) if critic else None
        nets = [m for m in (self.policy, self.critic) if m is not None]
        self.trainable = [p for m in nets for p in m.parameters() if p.requires_grad]
        wd = cfg.optim.weight_decay
        self.optimizer = make_optimizer([g for m in nets for g in decay_param_groups(m, wd)], cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim))
        self.kl_ctl = make_kl_controller(cfg.kl)
        self.step, self.pos = 0, 0
        if ckpt is not None:
            self._resume(ckpt)
        self.dist.broadcast_from_main(self.trainable)  # every rank starts from rank 0's weights
        self.sampler = Sampler(self.policy, self.tok, self.accel.backend(cfg.rollout.backend),
                               cfg.model.name_or_path, cfg.run.seed, self.accel.replay_mb)
        self.logger = MetricLogger(self.run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=self.step,
                                   desc=name, is_main=self.dist.is_main)
        self.resumed_from = ckpt

    # --- setup -----------------------------------------------------------------------------------------
    def _environment(self) -> EnvRunner:
        """env.name's environment, or the prompts of data.source with reward.spec as a single-turn one."""
        cfg = self.cfg
        ecfg = cfg.env
        if ecfg.name:
            from rlhfkit import envs

            self.prompts, self.reward_fn = None, None
            runner = EnvRunner(lambda: envs.make(ecfg.name, **ecfg.kwargs), self.tok, cfg.data.template,
                               ecfg.max_turns, ecfg.on_error, ecfg.step_timeout_s, ecfg.name)
            self.n_problems = len(runner.env) if hasattr(runner.env, "__len__") else 0
            return runner
        from rlhfkit.envs.rewards import RewardEnv

        self.prompts = load_prompts(cfg.data, self.tok)
        self.reward_fn = load_reward(cfg.reward.spec, self.device)
        self.n_problems = len(self.prompts.ids)
        return EnvRunner(lambda: RewardEnv(self.prompts, self.reward_fn), self.tok, cfg.data.template)

    def _critic(self, ckpt: Path | None) -> torch.nn.Module:
        """PPO's critic: a saved ScalarHeadModel (a full critic's checkpoint, or cfg.critic), else the
        policy's backbone + a zero head. With LoRA its backbone gets adapters (the head trains in full);
        a LoRA run resumes them from the trainer state."""
        from rlhfkit.accel.activations import use_fast_activations
        from rlhfkit.models.heads import ScalarHeadModel

        cfg = self.cfg
        path = str(ckpt / "critic") if ckpt is not None and not self.lora else cfg.critic
        if path:
            critic = ScalarHeadModel.from_pretrained(path)
        else:
            critic = ScalarHeadModel.from_causal_lm(load_policy(cfg.model.name_or_path, cfg.model.dtype,
                                                                self.device, fast=self.accel.fast_decode))
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(critic.backbone)
        if self.lora:
            critic.backbone = apply_lora(critic.backbone, cfg.model, causal_lm=False)
        if self.accel.fast_decode:
            critic = use_fast_activations(critic)
        return critic.to(self.device).train()

    def _resume(self, ckpt: Path) -> None:
        load_weights_into(self.policy, ckpt / "model")
        state = load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl"])
        self.step, self.pos = state["step"], state["pos"]
        if self.critic is not None and self.lora:  # the critic's adapters and head
            self.critic.load_state_dict(state["critic"], strict=False)
            weights.changed()

    def header(self, detail: str) -> str:
        n_train = sum(p.numel() for p in self.trainable) / 1e6
        critic = f" + {count_params(self.critic) / 1e6:.2f}M critic" if self.critic is not None else ""
        if self.cfg.env.name:
            turns = self.env.turns_per_episode
            what = (f"environment {self.cfg.env.name} ({self.n_problems or 'unbounded'} problems, "
                    + ("single-turn" if self.env.single else f"up to {turns} turns per episode, sampled through HF's "
                       "forward with one KV cache per episode, plain training forward: the replay record is "
                       "single-turn only") + f"), {self.U} problems x {self.G} "
                    f"episodes per step, {detail}")
        else:
            what = (f"{len(self.prompts.ids)} prompts, {self.U} prompts x {self.G} samples per step, "
                    f"{detail}reward {self.cfg.reward.spec}, ")
        return (f"{self.name}: {count_params(self.policy) / 1e6:.2f}M policy{critic} params ({n_train:.2f}M "
                f"trained), {what}KL coef {self.kl_ctl.value}, {self.dist.world} "
                f"process(es) on {self.device}{run_note(self.dist, self.accel)}"
                + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""))

    # --- what updates use ------------------------------------------------------------------------------
    def logprobs(self, ro: Rollout, with_entropy: bool = False, entropy_grad: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's log-probs (b, C) of the rollout's tokens, with gradients (and entropies)."""
        return self.accel.logprobs(self.policy, ro, self.params.temperature, with_entropy, entropy_grad)

    def ref_logprobs(self, ro: Rollout) -> torch.Tensor:
        """The reference's log-probs (b, C), no gradients (LoRA: the policy with adapters off)."""
        t = time.perf_counter()
        out = reference_logprobs(self.policy, self.ref, ro, self.params.temperature, self.cfg.optim.batch_size,
                                 self.accel.logprobs)
        self.t_ref += time.perf_counter() - t
        return out

    def values(self, ro: Rollout) -> torch.Tensor:
        """The critic's value before each completion token (b, C)."""
        return self.accel.values(self.critic, ro)

    def micro_batches(self, n: int, group: int = 1) -> list[slice]:
        return micro_batches(n, self.cfg.optim.batch_size, group)

    def gather(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return global_rows(self.dist, *xs)

    def mine(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        return mine(self.dist, x, width)

    def sum(self, x: float | torch.Tensor) -> float:
        return self.dist.sum(x)

    def optimizer_step(self, loss: float, step: int) -> float:
        """After the backward passes of one update: stop on a NaN loss (every rank sees it), sum the
        gradients over ranks (the losses are normalised by global counts, so the sum is the batch's), clip,
        step and zero them. Returns the gradient norm before clipping."""
        check_finite("loss", self.dist.sum(loss), step, self.run_dir)
        self.dist.sum_gradients(self.trainable)
        norm = self.accel.clip_and_step(self.optimizer, self.trainable, self.cfg.optim.grad_clip or float("inf"))
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def sequence_rewards(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """REINFORCE's and RLOO's reward of each completion (B,): the score minus the KL coefficient times
        the sequence KL to the reference (cfg.kl.estimator summed over the completion; 0 without a
        reference); and that KL (B,). Global batch."""
        seq_kl = torch.zeros(len(b.ro.prompts), device=self.device)
        if self.cfg.kl.coef:
            from rlhfkit.rl.losses import kl_penalty

            per_token = kl_penalty(b.ro.logprobs, self.ref_logprobs(b.ro), self.cfg.kl.estimator)
            seq_kl = (per_token * b.mask).sum(-1)  # (b,)
        all_kl = self.gather(seq_kl)[0]
        return b.all_scores - self.kl_ctl.value * all_kl, all_kl

    def sequence_step(self, b: Batch, advantages: torch.Tensor, loss_fn: Callable) -> dict[str, float]:
        """One optimizer step on a loss of each completion's summed log-prob (REINFORCE, RLOO):
        loss_fn(seq_logprobs (m,), advantages (m,)) -> (loss over the global batch, stats) per micro-batch."""
        st = {"loss/policy": 0.0, "policy/entropy": 0.0, "ppo/clipfrac": 0.0}
        for mb in self.micro_batches(len(b.ro.prompts), self.G):
            logprobs, entropy = self.logprobs(b.ro.rows(mb), with_entropy=True)
            loss, stats = loss_fn(logprobs.sum(-1), advantages[mb])  # (m,): already masked
            loss.backward()
            st["loss/policy"] += float(loss.detach())
            st["policy/entropy"] += float((entropy * b.mask[mb]).sum()) / b.n_tokens
            st["ppo/clipfrac"] += float(stats.get("clipfrac", 0.0)) * (mb.stop - mb.start) / self.B
        st["grad_norm"] = self.optimizer_step(st["loss/policy"], b.step)
        return {k: v if k == "grad_norm" else self.sum(v) for k, v in st.items()}

    # --- the loop --------------------------------------------------------------------------------------
    def sample_and_score(self) -> Batch:
        """This rank's share of the step's episodes (whole groups: one problem each), run and scored."""
        cfg, dist = self.cfg, self.dist
        if self.order is not None:
            seeds = [i for _, i in self.order.indices(self.pos, self.U)][dist.shard(self.U)]
        else:  # an environment without a fixed problem set: episode seeds count up
            seeds = list(range(self.pos, self.pos + self.U))[dist.shard(self.U)]
        n_rand = self.env.turns_per_episode * self.params.max_new_tokens
        uniforms = step_uniforms(cfg.run.seed, self.step, self.B, n_rand)[dist.shard(self.B)]
        eps: Episodes = self.env(self.sampler, seeds, self.G, self.params, uniforms)
        ro = eps.ro
        mask = ro.completion_mask.float()
        raw = eps.returns.to(self.device)
        scores = shape_scores(raw, ro.finished, ro.lengths, cfg.reward.missing_eos_penalty, cfg.reward.length_penalty)
        all_raw, all_scores, all_lengths, all_finished, all_mask = self.gather(raw, scores, ro.lengths,
                                                                               ro.finished, mask)
        check_finite("reward", all_raw, self.step + 1, self.run_dir)
        env_metrics = {}
        if cfg.env.name:
            errs = torch.tensor([e is not None for e in eps.errors])
            ok, turns, errs = self.gather(*(x.float().to(self.device) for x in (eps.success, eps.turns, errs)))
            env_metrics = {"env/success_rate": float(ok.mean()), "env/turns_mean": float(turns.mean()),
                           "env/errors": float(errs.sum())}
            for e in eps.errors:
                if e is not None:
                    self.logger.write(f"step {self.step + 1}: episode skipped: {e}")
        return Batch(ro, mask, raw, scores, all_raw, all_scores, all_lengths, all_finished, all_mask,
                     max(float(all_mask.sum()), 1.0), self.step + 1, env_metrics)

    def checkpoint(self) -> None:
        if self.dist.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "kl": self.kl_ctl.state_dict(), "pos": self.pos}
            models = {"model": self.policy}
            if self.critic is not None and self.lora:  # adapters + head; the base is rebuilt from the policy
                names = {n for n, p in self.critic.named_parameters() if p.requires_grad}
                state["critic"] = {k: v for k, v in self.critic.state_dict().items() if k in names}
            elif self.critic is not None:
                models["critic"] = self.critic
            save_checkpoint(self.run_dir, self.step, models=models, tokenizer=self.tok,
                            keep=self.cfg.log.keep_checkpoints, state=state)
        self.dist.barrier()

    def finish(self, history: list[float]) -> dict[str, Any]:
        extra, save_more = {}, None
        if self.critic is not None:
            final_critic = self.run_dir / "final_critic"
            extra["final_critic"] = str(final_critic)

            def save_more() -> None:
                critic = self.critic
                if self.lora:  # a plain ScalarHeadModel on disk, like a full critic's
                    critic.backbone = critic.backbone.merge_and_unload()
                    weights.changed()
                critic.save_pretrained(final_critic)

        return finish_run(self.dist, self.run_dir, self.policy, self.tok, self.logger, self.step, history,
                          self.kl_ctl.value, self.t_start, save_more=save_more, **extra)


def run(cfg: Any, name: str, update: Callable[[RLRun, Batch], dict[str, float]], detail: str = "",
        critic: bool = False, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train with `update` as the algorithm's block; returns the run's summary (see the module docstring).
    `update(run, batch)` makes its optimizer step(s) and returns its metrics, "kl/mean" among them (the KL
    controller's input). `on_step(step, metrics)` is called after every step."""
    r = RLRun(cfg, name, critic)
    r.logger.write(r.header(detail))
    saved_step, history = r.step, []
    with GracefulStop() as stop, r.logger:
        while r.step < cfg.optim.max_steps:
            t0, r.t_ref = time.perf_counter(), 0.0
            batch = r.sample_and_score()
            t_gen = time.perf_counter() - t0
            stats = update(r, batch)
            r.scheduler.step()
            r.kl_ctl.update(stats["kl/mean"], r.B)
            r.step += 1
            r.pos += r.U

            dt = time.perf_counter() - t0
            n_gen = int(batch.all_lengths.sum())
            metrics = {
                "rollout/reward_mean": float(batch.all_raw.mean()), "rollout/reward_std": float(batch.all_raw.std()),
                "rollout/score_mean": float(batch.all_scores.mean()),
                "rollout/length_mean": float(batch.all_lengths.float().mean()),
                "rollout/finished_frac": float(batch.all_finished.float().mean()), "rollout/tokens": n_gen,
                **batch.env_metrics, **stats, "kl/coef": r.kl_ctl.value, "lr": r.scheduler.get_last_lr()[0], "perf/s_per_step": dt,
                "perf/gen_s": t_gen, "perf/ref_s": r.t_ref, "perf/tokens_per_s": n_gen / dt, "perf/samples_per_s": r.B / dt,
                "perf/peak_rss_mb": peak_rss_mb(), **r.accel.cache_metrics(r.ref),
            }
            history.append(metrics["rollout/reward_mean"])
            r.logger.advance(1, reward=metrics["rollout/reward_mean"])
            if r.step % cfg.log.log_every == 0 or r.step == cfg.optim.max_steps:
                r.logger.log(metrics, r.step)
            if (cfg.log.eval_every and r.step % cfg.log.eval_every == 0) or r.step == cfg.optim.max_steps:
                r.logger.log_text("samples", samples_table(batch.ro.prompts, batch.ro.completions, batch.raw), r.step)
            if on_step is not None:
                on_step(r.step, metrics)
            halt = should_stop(r.dist, stop, r.t_start, cfg.run.max_minutes)  # Ctrl-C, SIGTERM, time limit
            if (cfg.log.save_every and r.step % cfg.log.save_every == 0) or halt:
                r.checkpoint()
                saved_step = r.step
            if halt:
                break
        if saved_step != r.step:
            r.checkpoint()
    return r.finish(history)
