"""GPT-2's tanh-GELU with a faster CPU kernel of our own (csrc/gelu_tanh.c), and torch's as the fallback.

torch's tanh-GELU evaluates tanh with an exact but slow vector routine: on the trl-peer workload its
forward and backward take longer than the matmul before them. Our kernel computes the same function as
x / (1 + e^(-2u)) with a polynomial e^y the compiler vectorises: about 4x faster forward and backward on
training and decode shapes, and within 2e-7 of the float64 values (torch's backward: 2e-6); see
tests/test_activations.py and docs/benchmarks.md.

The kernel is plain C, compiled at first use with the machine's C compiler (`cc`, or $CC) for this CPU
(-march=native) and cached under the data directory ($RLHFKIT_DATA_DIR/native, keyed by the source, the
flags and the CPU), then loaded with ctypes. Built with -fopenmp and loaded after torch, it links torch's
own OpenMP runtime, so its loops run on torch's threads (torch.set_num_threads applies) and never fight
them for the cores. Where any of that is missing (no compiler, not Linux, another OpenMP runtime, a
failed build) or RLHFKIT_NATIVE=0, gelu() is torch's F.gelu: same results to float rounding, slower.
`native_status()` says which is in use and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("csrc") / "gelu_tanh.c"
_BASE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
_X86_FLAGS = ["-mprefer-vector-width=512"]  # AVX-512 machines: gcc would otherwise use 256-bit vectors
_state: dict = {}  # "lib": the loaded kernel or None, "status": why


def _cpu_signature() -> str:
    """What the compiled code depends on (-march=native): the machine and its CPU model and flags."""
    sig = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            sig += sorted({line.strip() for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        pass
    return "\n".join(sig)


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f
                    if any(k in line for k in ("libgomp", "libiomp", "libomp")) and "/" in line}
    except OSError:
        return set()


def _build(out: Path, cc: str) -> str:
    """Compile the kernel into `out` (atomically: concurrent first uses race harmlessly); returns ''
    or the compiler's complaint."""
    err = ""
    for flags in (_BASE_FLAGS + _X86_FLAGS, _BASE_FLAGS):  # the second for compilers without the first's
        tmp = ""
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            r = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120,
                               check=False)
            if r.returncode == 0:
                os.replace(tmp, out)
                return ""
            lines = (r.stderr or r.stdout).strip().splitlines()
            err = lines[-1] if lines else f"{cc} exited with {r.returncode}"
        except (OSError, subprocess.SubprocessError) as e:  # a read-only cache, a hung compiler
            err = str(e)
        finally:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
    return err


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("RLHFKIT_NATIVE", "1") == "0":
        return None, "off (RLHFKIT_NATIVE=0)"
    if not sys.platform.startswith("linux"):
        return None, f"off (built on Linux only, this is {sys.platform})"
    before = _openmp_runtimes()  # torch's (it is imported): the kernel must share it
    if not before or any("libgomp" not in p for p in before):
        return None, f"off (torch's OpenMP runtime is not GNU's libgomp: {sorted(before) or 'none'})"
    from rlhfkit.data.sources import data_dir

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_BASE_FLAGS + _X86_FLAGS).encode() + _cpu_signature().encode())
    path = data_dir() / "native" / f"gelu_tanh-{key.hexdigest()[:16]}.so"
    if not path.exists():
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            return None, f"off (no C compiler: {cc!r} not found; set CC)"
        err = _build(path, cc)
        if err:
            return None, f"off (compiling {_SOURCE.name} failed: {err})"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"off (loading {path} failed: {e})"
    if _openmp_runtimes() != before:  # it brought its own OpenMP, whose threads would fight torch's
        return None, f"off (loading it added an OpenMP runtime: {sorted(_openmp_runtimes() - before)})"
    for name in ("rlhfkit_gelu_tanh", "rlhfkit_gelu_tanh_backward"):
        getattr(lib, name).restype = None
    return lib, f"on ({path})"


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"], _state["status"] = _load()
    return _state["lib"]


def native_status() -> str:
    """'on (path)' if gelu() runs our kernel, else 'off (why)'."""
    _lib()
    return _state["status"]


def _native_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _lib() is not None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    """gelu(x) with the tanh approximation, no autograd."""
    if not _native_ok(x):
        return F.gelu(x, approximate="tanh")
    x = x.contiguous()
    y = torch.empty_like(x)
    _lib().rlhfkit_gelu_tanh(_ptr(x), _ptr(y), ctypes.c_int64(x.numel()))
    return y


def gelu_tanh_backward(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """dy * gelu'(x), no autograd; into `out` (which may be dy) if given."""
    if not _native_ok(dy, x) or (out is not None and not out.is_contiguous()):
        return torch.ops.aten.gelu_backward(dy, x, approximate="tanh") if out is None else \
            torch.ops.aten.gelu_backward.grad_input(dy, x, approximate="tanh", grad_input=out)
    dy, x = dy.contiguous(), x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    _lib().rlhfkit_gelu_tanh_backward(_ptr(dy), _ptr(x), _ptr(out), ctypes.c_int64(x.numel()))
    return out


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_tanh_forward(x)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no second derivative: an error, not a silent zero
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_tanh_backward(dy, x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu(x, approximate), with our kernel for approximate='tanh' on CPU float32 tensors."""
    if approximate != "tanh" or not _native_ok(x):
        return F.gelu(x, approximate=approximate)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanh.apply(x)
    return gelu_tanh_forward(x)


class GELUTanh(torch.nn.Module):
    """The tanh-GELU as a module (what rl.common.use_fast_activations puts in GPT-2's MLPs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, "tanh")
