"""Which speed-ups a run uses: chosen once at setup from `run.accel`, logged in the run header.

The plain path is PyTorch and transformers only: HF's forward for sampling and training, torch's ops,
torch's allocator. The accelerated path (`run.accel: auto`, the default) adds, each where it applies:
  * kernels: our C kernels (models/native.py: sampling, log-probs, GELU, attention, gradient norm, the
    one-call GPT-2 decode step), built at first use with the machine's C compiler;
  * fast decode: our KV-cache decoders for GPT-2 and Llama (rl/fastdecode.py), for sampling, the
    reference's log-probs and the critic's forward; GPT-2's GELU modules swapped for ours;
  * replay: a rollout's record of its sampling forward stands in for the first training forward while the
    weights are unchanged (utils/weights.py; rollout.replay_max_mb);
  * the reference's prompt cache (kl.ref_cache_mb);
  * our caching CPU allocator (run.cpu_allocator).
Every part computes what the plain path computes, to float rounding: tests/test_accel_equivalence.py
runs every trainer both ways with the production optimizer and compares losses, statistics, rewards and
final weights.

`run.accel: off` (or the environment variable RLHFKIT_ACCEL=off, which overrides the config) runs the
plain path. RLHFKIT_NATIVE=0 turns off only our compiled code (kernels and allocator).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.errors import ConfigError

MODES = ("auto", "off")


@dataclass
class Accel:
    """The parts of the accelerated path one run uses (see the module docstring)."""
    mode: str = "off"
    why: str = ""                  # where the mode came from
    kernels: bool = False
    fast_decode: bool = False      # our decoders and forwards (GPT-2 / Llama); else HF's forward
    replay_mb: float = 0.0
    ref_cache_mb: float = 0.0
    allocator: str = "system"      # run.cpu_allocator's mode to apply
    notes: dict[str, str] = field(default_factory=dict)  # part -> 'on (...)' / 'off (why)'

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def backend(self, requested: str) -> str:
        """The rollout decoder to use for rollout.backend=`requested`."""
        return "hf" if requested == "auto" and not self.fast_decode else requested

    def header(self) -> str:
        """One line for the run header: the mode, and each part with why it is on or off."""
        parts = ", ".join(f"{k} {v}" for k, v in self.notes.items())
        return f"accel: {self.mode} ({self.why})" + (f": {parts}" if parts else "")


def requested_mode(config_mode: str) -> tuple[str, str]:
    """The mode to use and where it came from: RLHFKIT_ACCEL if set, else the config's run.accel."""
    env = os.environ.get("RLHFKIT_ACCEL", "").strip().lower()
    if env:
        if env not in MODES:
            raise ConfigError(f"RLHFKIT_ACCEL={env!r}: expected one of {', '.join(MODES)}")
        return env, "RLHFKIT_ACCEL"
    return config_mode, "run.accel"


def select(cfg: Any, device: Any) -> Accel:
    """Choose the accelerated path's parts for an RL run config (`run`, `rollout`, `kl` sections) on
    `device`, and switch our kernels on or off for this process accordingly."""
    from rlhfkit.models import native

    mode, source = requested_mode(cfg.run.accel)
    rollout, kl = getattr(cfg, "rollout", None), getattr(cfg, "kl", None)
    if mode == "off":
        native.set_enabled(False)
        if rollout is not None and rollout.backend == "fast":
            raise ConfigError("rollout.backend=fast is part of the accelerated path; with run.accel=off use "
                              "auto or hf")
        acc = Accel("off", f"{source}=off", allocator="system")
        acc.notes["path"] = "plain PyTorch/transformers"
        return acc
    native.set_enabled(True)
    if rollout is None:  # a supervised stage (DPO): our kernels only
        acc = Accel("auto", f"{source}=auto", kernels=native.lib() is not None, allocator="system")
        acc.notes["kernels"] = _kernels_note(acc.kernels)
        return acc
    acc = Accel("auto", f"{source}=auto", kernels=native.lib() is not None, fast_decode=rollout.backend != "hf",
                replay_mb=rollout.replay_max_mb if rollout.backend != "hf" else 0.0,
                ref_cache_mb=getattr(kl, "ref_cache_mb", 0.0) if rollout.backend != "hf" else 0.0,
                allocator=cfg.run.cpu_allocator)
    acc.notes["kernels"] = _kernels_note(acc.kernels)
    acc.notes["fast decode"] = ("on (GPT-2, Llama)" if acc.fast_decode else "off (rollout.backend=hf)")
    acc.notes["replay"] = (f"on (up to {acc.replay_mb:g} MB)" if acc.replay_mb else
                           "off (" + ("rollout.replay_max_mb=0" if acc.fast_decode else "rollout.backend=hf") + ")")
    if kl is not None and getattr(kl, "coef", 0):
        acc.notes["ref cache"] = (f"on (up to {acc.ref_cache_mb:g} MB)" if acc.ref_cache_mb
                                  else "off (kl.ref_cache_mb=0)")
    return acc


def _kernels_note(on: bool) -> str:
    from rlhfkit.models import native

    return "on" if on else native.native_status()
