"""A thin layer over `accelerate`: the same training loop runs as one process, under `torchrun`, or under
`accelerate launch` (DDP with gloo on CPU / NCCL on GPU, DeepSpeed, FSDP), unchanged.

Data sharding is ours, not accelerate's: every rank walks the same global batch order and takes its own
slice, so a run's loss is the same whatever the world size for the same global batch, and a checkpoint
resumes across world sizes.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


class Dist:
    def __init__(self, device: str = "auto", precision: str = "fp32") -> None:
        from accelerate import Accelerator

        if device.startswith("cuda") and ":" in device and "LOCAL_RANK" not in os.environ:
            torch.cuda.set_device(torch.device(device))
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch` from its config
            mixed = None
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one global state per process; a single process may run several stages in a
            # row (rlhfkit loop, tests) with different settings, so start each from a clean state.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        # device auto without a GPU must say cpu: accelerate joins torchrun's CPU processes into one group
        # only when told to run on the CPU (otherwise every rank trains alone, as world size 1).
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.acc = Accelerator(cpu=cpu, mixed_precision=mixed)
        self.rank = self.acc.process_index
        self.world = self.acc.num_processes
        if self.world != int(os.environ.get("WORLD_SIZE", "1")):
            raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up "
                               f"{self.world} (run.device={device!r})")
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device

    def prepare(self, *objs: Any) -> Any:
        return self.acc.prepare(*objs)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on micro-batches that are not the last of an accumulation."""
        if sync or self.world == 1:
            yield
        else:
            with self.acc.no_sync(model):
                yield

    def clip_grad_norm(self, params: Any, max_norm: float) -> float:
        if max_norm > 0:
            return float(self.acc.clip_grad_norm_(params, max_norm))
        norms = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def mean(self, value: float | torch.Tensor) -> float:
        """Mean of a scalar over all ranks."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(1)
        if self.world > 1:
            t = self.acc.reduce(t, reduction="mean")
        return float(t.item())

    def sum(self, value: float | torch.Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(1)
        if self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return float(t.item())

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of x (the same number on each rank), concatenated in rank order: with
        contiguous shards that is the global batch order. A 2-D x is padded with zeros along dim 1 to the
        widest rank's (e.g. completions that stopped at different lengths)."""
        if self.world == 1:
            return x
        import torch.distributed as td

        is_bool = x.dtype == torch.bool  # gloo has no bool collectives
        y = x.to(torch.uint8) if is_bool else x
        if y.dim() == 2:
            width = torch.tensor([y.size(1)], device=y.device)
            td.all_reduce(width, op=td.ReduceOp.MAX)
            y = torch.nn.functional.pad(y, (0, int(width) - y.size(1)))
        y = y.contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        td.all_gather(parts, y)
        out = torch.cat(parts)
        return out.bool() if is_bool else out

    def broadcast_from_main(self, params: list[torch.Tensor]) -> None:
        """Give every rank rank 0's values of params (what DDP does when it wraps a model), so the ranks start
        identical even if they drew different random numbers while building (e.g. LoRA's init)."""
        if self.world == 1:
            return
        import torch.distributed as td

        from rlhfkit.utils import weights

        with torch.no_grad():
            for p in params:
                td.broadcast(p.data, src=0)
        weights.changed()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (sum) the gradients of params over ranks, one flat buffer per dtype. For loops that
        normalise each rank's loss by global counts (the RL stages): the sum over ranks is then exactly the
        gradient one process would get on the whole batch. A parameter without a gradient counts as zero."""
        if self.world == 1:
            return
        import torch.distributed as td

        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            td.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.acc.unwrap_model(model)

    def shard(self, n: int) -> slice:
        """This rank's slice of a global batch of n rows (n must divide evenly)."""
        if n % self.world:
            raise ValueError(f"global batch of {n} does not split over {self.world} processes")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)
