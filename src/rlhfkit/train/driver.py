"""The driver of the supervised stages (pretrain, SFT, DPO, the deep reward model): everything around a
stage's update, once.

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

A transformers model (LoRA or not) is checkpointed in HF format and its best validation model kept in
best/; any other module (the deep reward model's backbone + head) as a state dict in trainer_state.pt and
best/state.pt, which `load_best` loads back.
"""
from __future__ import annotations

import contextlib
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
from rlhfkit.utils.checkpoint import (
    checkpoint_step,
    is_hf_model,
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
    should_stop,
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
    # ("pos", examples consumed), the best validation value (and evaluations since) where the stage selects
    # its best model, tokens seen where it measures throughput, and the stage's own counters.
    state: dict[str, Any] = field(default_factory=dict)
    select: str | None = None  # the validation metric that picks final/; None: the last model
    higher_better: bool = False  # the direction of `select`
    ties_to_later: bool = False  # an equal `select` value counts as better (a discrete score, e.g. accuracy)
    wrapped: bool = True  # False: the model is not wrapped for the processes; the driver sums gradients
    owns_logger: bool = True
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
    def resume_step(self) -> int:
        """The step of the checkpoint this run resumes from (0: a fresh run); known before `start`, e.g. for
        a stage that opens its logger early."""
        return checkpoint_step(self.ckpt) if self.ckpt is not None else 0

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
              higher_better: bool = False, ties_to_later: bool = False, seq_len: int | None = None,
              counters: dict[str, Any] | None = None, wrap: bool = True,
              logger: MetricLogger | None = None) -> torch.nn.Module:
        """Optimizer and LR schedule for `model` (built, seeded, on the device), the resumed state if any,
        the model wrapped for the processes; then the logger and the run's header line. `select`: the
        validation metric that picks final/ (`higher_better` says its direction, `ties_to_later` whether an equal
        value is an improvement: it keeps the later step and resets the patience); `seq_len`: the sequence
        length for the MFU estimate (and log tokens / throughput); None: no throughput metrics. `counters`:
        the stage's own state saved with each checkpoint (run.state[name], restored on resume). `wrap=False`
        leaves the model unwrapped (a stage that calls it through another object): every process starts
        from the main process's weights and the driver sums the gradients over processes before clipping, so
        each process's loss must be its share of the global batch's. `logger`: one the stage opened
        already (with start_step=run.resume_step). Returns the model to train (wrapped if `wrap`)."""
        dist, cfg = self.dist, self.cfg
        self.tok, self.select, self.higher_better, self.wrapped = tok, select, higher_better, wrap
        self.ties_to_later = ties_to_later
        worst = -math.inf if higher_better else math.inf
        self.state = {"pos": 0, **({"best_val": worst, "bad_evals": 0} if select else {}),
                      **({"tokens_seen": 0} if seq_len else {}), **(counters or {})}
        self.optimizer = make_optimizer(model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim))
        if self.ckpt is None and dist.is_main:
            shutil.rmtree(self.run_dir / "best", ignore_errors=True)  # an earlier run's best model
        if self.ckpt is not None:
            saved = load_trainer_state(self.ckpt)  # also restores the RNG states (dropout continues exactly)
            if "model" in saved:  # a state-dict model
                model.load_state_dict(saved["model"])
            else:
                load_weights_into(model, self.ckpt / "model")
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.step = saved["step"]
            # A counter missing from an older checkpoint keeps its start value.
            self.state = {k: saved.get(k, v) for k, v in self.state.items()}
        if wrap:
            self.model, self.optimizer = dist.prepare(model, self.optimizer)
        else:
            self.model = model
            dist.broadcast_from_main([p for p in model.parameters() if p.requires_grad])
        self.model.train()
        if seq_len:
            c = model.config
            flops = model_flops_per_token(count_params(model), c.num_hidden_layers, c.hidden_size, seq_len,
                                          frozen=count_params(model, frozen_only=True))
            self.meter = Throughput(flops, peak_flops(dist.device))
        self.owns_logger = logger is None
        self.logger = logger if logger is not None else MetricLogger(
            self.run_dir, cfg.log, total_steps=cfg.optim.max_steps, start_step=self.step, desc=self.stage,
            is_main=dist.is_main)
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
                bare = dist.unwrap(self.model)
                hf = is_hf_model(bare)
                save_checkpoint(self.run_dir, self.step, models={"model": bare} if hf else {},
                                tokenizer=self.tok, keep=cfg.log.keep_checkpoints,
                                state={"optimizer": self.optimizer.state_dict(),
                                       "scheduler": self.scheduler.state_dict(), **self.state,
                                       **({} if hf else {"model": bare.state_dict()})})
            dist.barrier()

        # A logger the stage opened is the stage's to close.
        with GracefulStop() as stop, (log if self.owns_logger else contextlib.nullcontext()):
            while self.step < cfg.optim.max_steps:
                s = step()
                if not math.isfinite(s.loss):
                    last_good = latest_checkpoint(self.run_dir) or "none"
                    raise TrainingError(f"loss is {s.loss} at step {self.step + 1}; stopped without "
                                        f"updating. Last good checkpoint: {last_good} (lower optim.lr?)")
                if not self.wrapped:
                    dist.sum_gradients([p for p in self.model.parameters() if p.requires_grad])
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
                    # A stage whose epochs differ in size logs its own "epoch" among its stats.
                    log.log({"loss/train": s.loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                             **tokens, "epoch": self.pos / epoch_size, **s.stats,
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
            improved = (val > st["best_val"] if self.higher_better else val < st["best_val"]) or (
                self.ties_to_later and val == st["best_val"])
            st["best_val"], st["bad_evals"] = (val, 0) if improved else (st["best_val"], st["bad_evals"] + 1)
        if self.dist.is_main:
            if improved:
                self._save_best()
            if samples:
                samples(self.step)

    def _save_best(self) -> None:
        bare, best = self.dist.unwrap(self.model), self.run_dir / "best"
        if is_hf_model(bare):
            save_model(best, bare, self.tok)
            return
        best.mkdir(parents=True, exist_ok=True)
        torch.save(bare.state_dict(), best / "state.tmp")
        (best / "state.tmp").replace(best / "state.pt")  # never half a file

    def load_best(self) -> bool:
        """Load the best validation weights back into a state-dict model (every process); False (weights
        left as they are) if there is none, e.g. the run stopped before its first evaluation."""
        self.dist.barrier()
        f = self.run_dir / "best" / "state.pt"
        if not f.exists():
            return False
        bare = self.dist.unwrap(self.model)
        bare.load_state_dict(torch.load(f, map_location=next(bare.parameters()).device, weights_only=True))
        return True

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
