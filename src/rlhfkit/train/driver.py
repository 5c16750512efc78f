"""The driver of the supervised stages (pretrain, SFT, DPO): everything around a stage's update, once.

A stage keeps what is its own (data, model, the loss of one optimizer step, evaluation, summary) and calls:

    run = driver.setup("sft", cfg, cfg.run.precision)  # threads, processes, run dir + config.yaml
    ...                                                # data, tokenizer, model (seeded)
    model = run.start(model, tok, header, ...)         # optimizer, schedule, resume, DDP/DeepSpeed, logger
    def step() -> Step: ...                            # forward/backward of batch run.pos (micro_batches)
    run.train(step, epoch_size, evaluate=...)          # the loop below
    return run.finish(summary, done)                   # final/ and summary.json

One step of `train`: the stage's step -> NaN check -> clip -> optimizer and LR schedule -> log -> evaluate
(on schedule, at the end, and, where the stage selects its best model, when stopping early) -> keep the
best -> checkpoint -> stop. The data position `pos` is a global count of examples consumed, so a run
resumes exactly from its latest checkpoint (weights, optimizer, schedule, position, counters and RNG
states), on any number of processes with the same global batch. Ctrl-C / SIGTERM / the time limit stop the
run after the current step with a checkpoint, at the same step on every process.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import TrainingError
from rlhfkit.models.factory import count_params, lr_lambda, make_optimizer
from rlhfkit.rl.common import should_stop  # Ctrl-C / SIGTERM / time limit, agreed by every process
from rlhfkit.utils.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights_into,
    save_checkpoint,
    save_model,
)
from rlhfkit.utils.distributed import Dist
from rlhfkit.utils.logging import MetricLogger
from rlhfkit.utils.runtime import (
    GracefulStop,
    Throughput,
    default_run_dir,
    model_flops_per_token,
    peak_flops,
    quiet_hf,
    set_threads,
    write_run_config,
)


@dataclass
class Step:
    """What a stage's step returns: the loss of the global batch (the same on every process), other
    statistics of the global batch to log, and the tokens it trained on (for throughput / MFU)."""
    loss: float
    stats: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


def setup(stage: str, cfg: Any, precision: str = "fp32") -> Run:
    """Threads, processes, the run directory (runs/<stage> unless log.run_dir) with its config.yaml, and
    the checkpoint to resume from (run.resume). `precision`: run.precision for the stages that train under
    autocast (pretrain, SFT)."""
    t_start = time.time()
    set_threads(cfg.run.threads)
    quiet_hf()
    dist = Dist(cfg.run.device, precision)
    run_dir = default_run_dir(stage, cfg.log.run_dir)
    if dist.is_main:
        write_run_config(run_dir, cfg)
    ckpt = latest_checkpoint(run_dir) if cfg.run.resume else None
    return Run(stage, cfg, dist, run_dir, ckpt, t_start)


@dataclass
class Run:
    """One run of a stage: what `setup` found, then what `start` built; `train` and `finish` use both."""

    stage: str
    cfg: Any
    dist: Dist
    run_dir: Path
    ckpt: Path | None  # the checkpoint this run resumes from
    t_start: float
    step: int = 0
    # Everything saved with a checkpoint besides weights, optimizer and schedule: the data position
    # ("pos", examples consumed), the best validation loss (and evaluations since) where the stage selects
    # its best model, tokens seen where it measures throughput.
    state: dict[str, Any] = field(default_factory=dict)
    select: str | None = None  # the validation metric (lower is better) that picks final/; None: the last
    model: torch.nn.Module | None = None  # wrapped for the processes (DDP, DeepSpeed, ...)
    tok: Any = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    logger: MetricLogger | None = None
    meter: Throughput | None = None

    @property
    def pos(self) -> int:
        return self.state["pos"]

    @property
    def best_val(self) -> float | None:
        """The best `select` value so far; None before the first evaluation."""
        v = self.state.get("best_val", math.inf)
        return v if math.isfinite(v) else None

    @property
    def global_bs(self) -> int:
        """Examples per optimizer step, over all processes and micro-batches."""
        o = self.cfg.optim
        return o.batch_size * o.grad_accum * self.dist.world

    def start(self, model: torch.nn.Module, tok: Any, header: str, *, select: str | None = None,
              seq_len: int | None = None) -> torch.nn.Module:
        """Optimizer and LR schedule for `model` (built, seeded, on the device), the resumed state if any,
        the model wrapped for the processes; then the logger and the run's header line. `seq_len`: the
        sequence length for the MFU estimate (and log tokens / throughput); None: no throughput metrics.
        Returns the wrapped model, the one to train."""
        dist, cfg = self.dist, self.cfg
        self.tok, self.select = tok, select
        self.state = {"pos": 0, **({"best_val": math.inf, "bad_evals": 0} if select else {}),
                      **({"tokens_seen": 0} if seq_len else {})}
        self.optimizer = make_optimizer(model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim))
        if self.ckpt is not None:
            load_weights_into(model, self.ckpt / "model")
            saved = load_trainer_state(self.ckpt)  # also restores the RNG states (dropout continues exactly)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.step = saved["step"]
            # A counter missing from an older checkpoint keeps its start value.
            self.state = {k: saved.get(k, v) for k, v in self.state.items()}
        self.model, self.optimizer = dist.prepare(model, self.optimizer)
        self.model.train()
        if seq_len:
            c = model.config
            flops = model_flops_per_token(count_params(model), c.num_hidden_layers, c.hidden_size, seq_len,
                                          frozen=count_params(model, frozen_only=True))
            self.meter = Throughput(flops, peak_flops(dist.device))
        self.logger = MetricLogger(self.run_dir, cfg.log, total_steps=cfg.optim.max_steps,
                                   start_step=self.step, desc=self.stage, is_main=dist.is_main)
        self.logger.write(f"{self.stage}: {header}; {dist.world} process(es) on {dist.device}"
                          + (f"; resumed from {self.ckpt} at step {self.step}" if self.ckpt else ""))
        return self.model

    def micro_batches(self, rows: Any) -> Iterator[Any]:
        """This process's rows of the step in micro-batches of optim.batch_size; gradients are averaged
        over the processes only on the last one (backward inside the loop body)."""
        bs, accum = self.cfg.optim.batch_size, self.cfg.optim.grad_accum
        for k in range(accum):
            with self.dist.no_sync(self.model, sync=(k == accum - 1)):
                yield rows[k * bs:(k + 1) * bs]

    def train(self, step: Callable[[], Step], epoch_size: int, *,
              evaluate: Callable[[], dict[str, float]] | None = None,
              samples: Callable[[int], None] | None = None, patience: int = 0) -> None:
        """Optimizer steps until optim.max_steps or a stop. `step()` does the forward and backward passes
        of the global batch at `pos`; `evaluate()` returns validation metrics (with `select` among them);
        `samples(step)` shows a few generations after each evaluation (main process); `patience` stops
        after that many evaluations without a better `select` (0: never)."""
        cfg, dist, log = self.cfg, self.dist, self.logger
        saved_step = self.step

        def checkpoint() -> None:
            nonlocal saved_step
            saved_step = self.step
            if dist.is_main:
                save_checkpoint(self.run_dir, self.step, models={"model": dist.unwrap(self.model)},
                                tokenizer=self.tok, keep=cfg.log.keep_checkpoints,
                                state={"optimizer": self.optimizer.state_dict(),
                                       "scheduler": self.scheduler.state_dict(), **self.state})
            dist.barrier()

        with GracefulStop() as stop, log:
            while self.step < cfg.optim.max_steps:
                s = step()
                if not math.isfinite(s.loss):
                    last_good = latest_checkpoint(self.run_dir) or "none"
                    raise TrainingError(f"loss is {s.loss} at step {self.step + 1}; stopped without "
                                        f"updating. Last good checkpoint: {last_good} (lower optim.lr?)")
                grad_norm = dist.clip_grad_norm(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.state["pos"] += self.global_bs
                if self.meter:
                    self.state["tokens_seen"] += s.tokens
                    self.meter.tick(s.tokens)
                log.advance(1, loss=s.loss)
                last = self.step == cfg.optim.max_steps

                if self.step % cfg.log.log_every == 0 or last:
                    tokens = {"tokens": self.state["tokens_seen"]} if self.meter else {}
                    log.log({"loss/train": s.loss, **s.stats, "lr": self.scheduler.get_last_lr()[0],
                             "grad_norm": grad_norm, **tokens, "epoch": self.pos / epoch_size,
                             **(self.meter.read() if self.meter else {})}, self.step)
                halt = should_stop(dist, stop, self.t_start, cfg.run.max_minutes)
                # Evaluate on schedule, at the end, and when stopping early if final/ is the best model.
                if evaluate and ((cfg.log.eval_every and self.step % cfg.log.eval_every == 0) or last
                                 or (halt and self.select)):
                    self._evaluate(evaluate, samples)
                early = bool(patience) and self.state["bad_evals"] >= patience
                if early:
                    log.write(f"early stop: no validation improvement in {patience} evaluations")
                if (cfg.log.save_every and self.step % cfg.log.save_every == 0) or halt or early:
                    checkpoint()
                if halt or early:
                    break
            if saved_step != self.step:
                checkpoint()

    def _evaluate(self, evaluate: Callable[[], dict[str, float]],
                  samples: Callable[[int], None] | None) -> None:
        metrics = evaluate()
        self.logger.log(metrics, self.step)
        improved = False
        if self.select:
            val, st = metrics[self.select], self.state
            improved = val < st["best_val"]
            st["best_val"], st["bad_evals"] = (val, 0) if improved else (st["best_val"], st["bad_evals"] + 1)
        if self.dist.is_main:
            if improved:
                save_model(self.run_dir / "best", self.dist.unwrap(self.model), self.tok)
            if samples:
                samples(self.step)

    def finish(self, summary: dict[str, Any], done: str = "") -> dict[str, Any]:
        """final/ (the best validation model where the stage selects one and it exists, else the last) and
        summary.json: {"steps", **summary, "wall_s", "final_model"}; returns it (empty on other processes)."""
        out: dict[str, Any] = {}
        if self.dist.is_main:
            final = self.run_dir / "final"
            if self.select and (self.run_dir / "best").exists():
                if final.exists():
                    shutil.rmtree(final)
                shutil.copytree(self.run_dir / "best", final)
            else:
                save_model(final, self.dist.unwrap(self.model), self.tok)
            wall = time.time() - self.t_start
            out = {"steps": self.step, **summary, "wall_s": round(wall, 1), "final_model": str(final)}
            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=1))
            self.logger.write(f"done: {self.step} steps in {wall:.0f}s" + (f"; {done}" if done else "")
                              + f"; model in {final}")
        self.dist.barrier()
        return out
