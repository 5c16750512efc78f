"""A caching allocator for torch's large CPU tensors (csrc/cpu_alloc.cpp): less RSS, no slower.

An RL step frees and re-allocates the same few hundred large blocks (each micro-batch's activations,
gradients and logits) with sizes that change a little from step to step. glibc's heap fragments under
that: on `rlhfkit bench trl-peer`'s GRPO at micro-batch 32 it holds 275 MB while at most 196 MB are in
use. This allocator gives every block of 256 KiB or more its own mapping, keeps freed ones in a pool of at
most 256 MB (reused by size class, the most recently freed first) and unmaps the rest, so RSS is what is
in use plus at most the pool. Measured on that workload: peak RSS 601-604 MB against 626-633 MB, at the
same speed (docs/benchmarks.md). The cap is 256 MB because PPO's step cycles through more than 128 MB of
freed blocks: with 128 MB it mapped about 93 new blocks a step and ran 8% slower; GRPO and RLOO never fill
128 MB.

It is C++ against torch's own headers, compiled at first use with `c++` (or $CXX, about 1 s), cached
under the data directory like our kernels (accel/native.py), and installed process-wide with
c10::SetCPUAllocator. `run.cpu_allocator` chooses: "auto" (the RL trainers' default) installs it on CPU
runs where it can be built, "caching" insists (an error says why it cannot), "system" leaves torch's own
allocator, or turns ours off if an earlier run in this process installed it. RLHFKIT_NATIVE=0 turns it off
with our kernels. Smaller requests go to torch's default allocator either way.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from rlhfkit.accel.native import built_library, open_library
from rlhfkit.errors import ConfigError

_SOURCE = Path(__file__).with_name("csrc") / "cpu_alloc.cpp"
THRESHOLD = 256 << 10  # requests from this size on are ours
POOL_CAP = 256 << 20   # freed bytes kept for reuse at most
SLACK_PERCENT = 50     # a pooled block serves requests up to this much smaller than its size class
MODES = ("auto", "caching", "system")
_state: dict = {}      # "lib", "status"
NOT_IN_USE = "off (not in use: run.cpu_allocator is system, or no run asked for it)"
_STATS = ("live", "peak_live", "pooled", "mapped", "peak_mapped", "hits", "misses", "enabled")


def _flags() -> list[str]:
    include = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}"]


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("RLHFKIT_NATIVE", "1") == "0":
        return None, "off (RLHFKIT_NATIVE=0)"
    torch_dir = Path(torch.__file__).parent
    if not (torch_dir / "include" / "c10" / "core" / "CPUAllocator.h").exists():
        return None, f"off (torch's C++ headers are not in {torch_dir / 'include'})"
    path, why = built_library(_SOURCE, "CXX", "c++", [_flags()], f"torch {torch.__version__} {torch_dir}",
                              libs=[f"-L{torch_dir / 'lib'}", "-lc10"])
    if path is None:
        return None, f"off ({why.replace('no compiler', 'no C++ compiler')})"
    lib, err = open_library(path, ("rlhfkit_alloc_disable", "rlhfkit_alloc_trim", "rlhfkit_alloc_stats"))
    if lib is None:
        return None, f"off ({err})"
    lib.rlhfkit_alloc_install.restype = ctypes.c_int
    _state["path"] = path
    return lib, f"built ({path})"


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"], _state["status"] = _load()
    return _state["lib"]


def status() -> str:
    """'on (path)' while our allocator serves torch's CPU tensors, else 'off (why)'."""
    lib = _lib()
    if lib is None:
        return _state["status"]
    if stats()["enabled"]:
        return f"on ({_state['path']})"
    return NOT_IN_USE


def install(threshold: int | None = None, cap: int | None = None, slack: int | None = None,
            huge_pages: bool = True) -> bool:
    """Serve torch's CPU tensors of `threshold` bytes or more from our pool (process-wide; again to change
    the settings; None = the module's THRESHOLD, POOL_CAP, SLACK_PERCENT). False, with status() saying why,
    where it cannot."""
    lib = _lib()
    if lib is None:
        return False
    threshold = THRESHOLD if threshold is None else threshold
    cap = POOL_CAP if cap is None else cap
    slack = SLACK_PERCENT if slack is None else slack
    if not lib.rlhfkit_alloc_install(ctypes.c_int64(threshold), ctypes.c_int64(cap), ctypes.c_int64(slack),
                                     int(huge_pages)):
        _state["status"] = "off (another CPU allocator of higher priority is installed)"
        return False
    return True


def uninstall() -> None:
    """Back to torch's default allocator for new tensors; the pool is unmapped (live blocks when freed)."""
    if _state.get("lib") is not None:
        _state["lib"].rlhfkit_alloc_disable()


def trim(keep: int = 0) -> None:
    """Unmap pooled blocks, the least recently freed first, until at most `keep` bytes are pooled."""
    if _lib() is not None:
        _lib().rlhfkit_alloc_trim(ctypes.c_int64(keep))


def stats() -> dict[str, int]:
    """Bytes live / pooled / mapped (and their peaks), pool hits and misses, and whether it is on; all 0
    where it was never installed."""
    out = (ctypes.c_int64 * len(_STATS))()
    if _lib() is not None:
        _lib().rlhfkit_alloc_stats(out)
    return dict(zip(_STATS, out))


def use(mode: str, device: torch.device) -> str:
    """Apply run.cpu_allocator for a run on `device`; returns status()."""
    if mode not in MODES:
        raise ConfigError(f"run.cpu_allocator={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "system" or (mode == "auto" and device.type != "cpu"):
        uninstall()  # nothing to build for a run that does not use it
        return NOT_IN_USE
    if not install() and mode == "caching":
        raise ConfigError(f"run.cpu_allocator=caching, but our CPU allocator is {status()}; use auto or system")
    return status()
