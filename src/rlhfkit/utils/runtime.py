"""Device, seeding, threads, run directories, and throughput / MFU accounting."""
from __future__ import annotations

import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlhfkit.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

# CPU peak is measured (fp32 sgemm) once per CPU model and thread count, because 2-core machines
# differ by 2x (185 GFLOP/s on an AVX2 EPYC VM, 350 on an AVX-512 Xeon VM). RLHFKIT_PEAK_FLOPS overrides.
_CPU_PEAK: dict[tuple[str, int], float] = {}
# bf16 dense tensor-core peaks (fp32 runs use TF32 on these, roughly half).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                  "4090": 165e12, "3090": 71e12, "T4": 65e12, "V100": 125e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but no CUDA GPU is available (use cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def quiet_hf() -> None:
    """Silence transformers' per-save progress bars and info chatter; our logger reports progress."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    env = os.environ.get("RLHFKIT_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_FLOPS.items():
            if key in name:
                return val if dtype in (torch.bfloat16, torch.float16) else val / 2
        return 100e12
    return cpu_peak_flops()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_peak_flops() -> float:
    """Best fp32 matmul FLOP/s of this CPU with the current torch thread count (~0.3 s, then cached
    in memory and in the data directory)."""
    key = (cpu_model(), torch.get_num_threads())
    if key in _CPU_PEAK:
        return _CPU_PEAK[key]
    import json

    from rlhfkit.data.sources import data_dir

    cache = data_dir() / "cpu_peak_flops.json"
    table = {}
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    name = f"{key[0]}|{key[1]}"
    if name not in table:
        n = 1024
        g = torch.Generator().manual_seed(0)  # not the global RNG: measuring must not move a run's stream
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t))
        table[name] = best
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(table, indent=1))
        except OSError:
            pass
    _CPU_PEAK[key] = float(table[name])
    return _CPU_PEAK[key]


def model_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int, frozen: int = 0) -> float:
    """Training FLOPs per token: 6N for the matmuls (fwd+bwd) + 12·L·d·T for attention scores
    (the PaLM appendix B estimate, as in nanoGPT). Forward only is a third of this. `frozen` of the N
    parameters (LoRA's base weights) cost 4 instead of 6: forward and the gradient of the activations,
    no weight gradient."""
    return 6.0 * (n_params - frozen) + 4.0 * frozen + 12.0 * n_layer * d_model * seq_len


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


class Throughput:
    """Tokens/s and MFU over the last interval (call `tick(tokens)` per step, `read()` to log)."""

    def __init__(self, flops_per_token: float, peak: float) -> None:
        self.fpt, self.peak = flops_per_token, peak
        self.t, self.tokens, self.steps = time.perf_counter(), 0, 0

    def tick(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.t, 1e-9)
        tps = self.tokens / dt
        out = {"perf/tokens_per_s": tps, "perf/mfu": tps * self.fpt / self.peak,
               "perf/s_per_step": dt / max(self.steps, 1)}
        self.t, self.tokens, self.steps = now, 0, 0
        return out


def default_run_dir(stage: str, run_dir: str) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / stage


def write_run_config(run_dir: Path, cfg: Any) -> None:
    from rlhfkit.config import to_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")


class GracefulStop:
    """First Ctrl-C / SIGTERM asks the loop to stop after the current step (with a checkpoint);
    a second Ctrl-C aborts at once. Use as a context manager; test `stop.requested` once per step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)


def should_stop(dist: Any, stop: Any, t_start: float, max_minutes: float) -> bool:
    """Stop now (Ctrl-C / SIGTERM seen by GracefulStop, or past the time limit), agreed by every rank: one
    may see the signal or the clock a step later than another, and ranks stopping at different steps would
    leave the others waiting in a collective."""
    local = bool(stop.requested) or bool(max_minutes and time.time() - t_start > max_minutes * 60)
    return dist.sum(float(local)) > 0 if dist.world > 1 else local
