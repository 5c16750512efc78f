"""One `log(metrics, step)` that fans out to stdout / progress bar, metrics.jsonl, TensorBoard, W&B, MLflow.

Metric names are fixed across stages: `loss/train`, `loss/val`, `ppo/approx_kl`, `rollout/reward_mean`,
`perf/tokens_per_s`, `perf/mfu`, `lr`, ... Only the main process (rank 0) writes anything.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

# Metrics shown in the one-line summary, in this order, when present.
_HEADLINE = ("loss/train", "loss/val", "ppl/val", "loss/policy", "loss/value", "rollout/reward_mean",
             "reward/mean", "kl/mean", "ppo/approx_kl", "ppo/clipfrac", "lr", "perf/tokens_per_s",
             "perf/mfu", "perf/s_per_step")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def _clean(v: Any) -> Any:
    """JSON-safe value: NaN/inf become null (strict JSON), tensors become floats."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything before it is good
    return out


class MetricLogger:
    """Fan-out metrics logger. Use as a context manager or call close()."""

    def __init__(self, run_dir: str | Path, cfg: Any = None, *, total_steps: int = 0, start_step: int = 0,
                 desc: str = "", config: dict | None = None, is_main: bool = True) -> None:
        from rlhfkit.config import LogConfig

        self.cfg = cfg or LogConfig()
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self._tb = self._wandb = self._mlflow = self._bar = None
        self._t0 = time.time()
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        # On resume, drop lines from after the checkpoint so the curve has no duplicated steps.
        old = [r for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= start_step]
        with open(self.jsonl_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in old)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115  closed by close()
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
            except ImportError:
                self._tb = None  # tensorboard not installed: the JSONL file still has everything
        if self.cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("log.wandb_project is set but wandb is not installed "
                                  "(pip install wandb)") from None
            self._wandb = wandb.init(project=self.cfg.wandb_project, name=self.run_dir.name,
                                     dir=str(self.run_dir), config=config, resume="allow")
        if self.cfg.mlflow_uri:
            try:
                import mlflow
            except ImportError:
                raise ConfigError("log.mlflow_uri is set but mlflow is not installed "
                                  "(pip install mlflow)") from None
            mlflow.set_tracking_uri(self.cfg.mlflow_uri)
            mlflow.start_run(run_name=self.run_dir.name)
            if config:
                mlflow.log_params(_flatten(config))
            self._mlflow = mlflow
        if self.cfg.progress and total_steps and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc or self.run_dir.name,
                             dynamic_ncols=True, leave=True)

    # ----------------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int, *, echo: bool = True) -> None:
        if not self.is_main:
            return
        m = {k: _clean(v) for k, v in metrics.items()}
        record = {"step": step, "time_s": round(time.time() - self._t0, 3), **m}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        nums = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(nums, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in nums.items()}, step=step)
        if echo:
            self.write(self._line(m, step))

    def _line(self, m: dict, step: int) -> str:
        keys = [k for k in _HEADLINE if k in m and m[k] is not None]
        keys += [k for k in m if k not in keys and k.startswith(("eval/", "val/"))][:4]
        total = f"/{self.total_steps}" if self.total_steps else ""
        return f"step {step}{total} | " + " | ".join(f"{k} {_fmt(m[k])}" for k in keys)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Free text (e.g. sample completions) to TensorBoard and a samples.jsonl file."""
        if not self.is_main:
            return
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "tag": tag, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text.replace("\n", "  \n"), step)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
