"""GPT-2's tanh-GELU with a faster CPU kernel of our own (csrc/kernels.c, via accel/native.py), and
torch's as the fallback.

torch's tanh-GELU evaluates tanh with an exact but slow vector routine: on the trl-peer workload its
forward and backward take longer than the matmul before them. Our kernel computes the same function as
x / (1 + e^(-2u)) with a polynomial e^y the compiler vectorises: about 4x faster forward and backward on
training and decode shapes, and within 2e-7 of the float64 values (torch's backward: 2e-6); see
tests/test_activations.py and docs/benchmarks.md. It reads a strided (d0, d1, n) input in place (a
micro-batch's rows of a time-major record) and writes a contiguous result. Where our kernels are off
(accel/native.py says when), gelu() is torch's F.gelu: same results to float rounding, slower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.accel.native import i64, lib, native_ok, native_status, ptr, rows_of

__all__ = ["GELUTanh", "gelu", "gelu_tanh_and_backward_", "gelu_tanh_backward", "gelu_tanh_forward",
           "native_status", "use_fast_activations"]


def gelu_tanh_forward(x: torch.Tensor) -> torch.Tensor:
    """gelu(x) with the tanh approximation, no autograd; contiguous (x may be a strided view)."""
    if not native_ok(x):
        return F.gelu(x, approximate="tanh")
    if x.is_contiguous():
        y = torch.empty_like(x)
        lib().rlhfkit_gelu_tanh(ptr(x), ptr(y), *i64(x.numel()))
        return y
    rows = rows_of(x)
    if rows is None:
        return gelu_tanh_forward(x.contiguous())
    y = torch.empty(x.shape, dtype=x.dtype)
    lib().rlhfkit_gelu_tanh_strided(ptr(x), *i64(*rows), ptr(y))
    return y


def gelu_tanh_backward(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """dy * gelu'(x), no autograd; into `out` (which may be dy) if given. x may be a strided view."""
    if not native_ok(dy, x) or (out is not None and not out.is_contiguous()):
        return torch.ops.aten.gelu_backward(dy, x, approximate="tanh") if out is None else \
            torch.ops.aten.gelu_backward.grad_input(dy, x, approximate="tanh", grad_input=out)
    dy = dy.contiguous()
    rows = None if x.is_contiguous() else rows_of(x)
    if rows is None:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    if rows is None:
        lib().rlhfkit_gelu_tanh_backward(ptr(dy), ptr(x), ptr(out), *i64(x.numel()))
    else:
        lib().rlhfkit_gelu_tanh_backward_strided(ptr(dy), ptr(x), *i64(*rows), ptr(out))
    return out


def gelu_tanh_and_backward_(x: torch.Tensor, dg: torch.Tensor) -> torch.Tensor | None:
    """gelu(x) (returned, contiguous) and dg *= gelu'(x) in place, tanh approximation, in one pass of ours
    over x (one exponential for both); x may be a (d0, d1, n) view with contiguous rows, dg contiguous of
    x's shape. None (and dg untouched) where our kernels are off or this does not apply."""
    rows = rows_of(x) if native_ok(x, dg) else None
    if rows is None or not dg.is_contiguous() or dg.shape != x.shape:
        return None
    g = torch.empty(x.shape, dtype=x.dtype)
    lib().rlhfkit_gelu_tanh_and_backward_strided(ptr(x), *i64(*rows), ptr(dg), ptr(g))
    return g


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
    if approximate != "tanh" or not native_ok(x):
        return F.gelu(x, approximate=approximate)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanh.apply(x)
    return gelu_tanh_forward(x)


class GELUTanh(torch.nn.Module):
    """The tanh-GELU as a module (what use_fast_activations puts in GPT-2's MLPs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, "tanh")


def use_fast_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's tanh-GELU modules (transformers' Python NewGELUActivation: six elementwise kernels,
    each output kept for backward; or its GELUTanh: torch's fused but slow kernel) for ours
    (one fast kernel forward and one backward, torch's where ours cannot be built). The same function, equal to float rounding (~1e-6). The saved config is unchanged."""
    from transformers.activations import GELUTanh as HFGELUTanh
    from transformers.activations import NewGELUActivation

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) in (NewGELUActivation, HFGELUTanh):
                setattr(mod, child_name, GELUTanh())
    return model
