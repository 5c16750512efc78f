"""Our own KV-cache decoders for GPT-2 and Llama-architecture models: the decode step with as little Python
per token as we can manage.

They read the weights of an ordinary HF model (`GPT2LMHeadModel`, `LlamaForCausalLM`) in place, so they
always decode the current policy, with no copy or weight sync. Why not HF's forward: at the batch sizes of
RL on a CPU a decode step's matmuls take a few milliseconds, and HF's per-call machinery (cache objects,
mask building, attention dispatch, output dataclasses) is of the same order. On the trl-peer workload the
rollouts run at about twice the tokens/s of HF's generate() (docs/benchmarks.md). Any other architecture
decodes through HF's forward (rollout.HFDecoder).

Both decoders share one shape: `start()` runs the prompts once (U unique prompts, each then repeated
`repeat` times for a group of samples, so a prompt's prefill is computed once per group), and `step()`
feeds one token per row and returns the next logits. The cache is preallocated and time-major, (layers,
prompt + max_new, keys / values, B, kv_heads, head_dim), written in place. Left padding: pad keys are
masked, positions count real tokens only (as HF does), and a pad query attends to itself so no row of the
softmax is empty.

Equivalence with HF's forward is tested (tests/test_rollout.py); the logits agree to float rounding.

Packed weights (Llama, CPU float32, where MKL's packed sgemm is found: native.PackedWeight). At a decode
step's few rows most of a matmul's cost is MKL packing the weight matrix again at every call. The decoder
keeps each layer's q|k|v, o, gate|up and down weights and the LM head packed for the step's number of rows,
packed again in place when the weights stamp moves on (utils/weights.py; for a LoRA policy, the policy's
stamp), so each decode step's products read them as they are. It costs as much memory again as the
weights (so it is skipped for weights over an eighth of the machine's memory); on SmolLM2-135M with 32
rows on 2 cores the matmuls of a step take 71 ms instead of 100 ms.

Attention of the training passes (GPT-2: the critic's forward, the replay, the reference's): where our
kernels are built, `_Attention` runs it from the q|k|v projection's output with our forward and backward
(native.attention_forward / _backward), the prompt's keys a prefix that each group's rows share, so there
is no repeat or cat of keys, no copy of the output into the projection's layout, and the backward writes
the projection's gradient whole instead of three zero-filled gradients that autograd stacks.

Replay. A rollout can keep a `Record` of its forward pass: the output of every linear layer and of the LM
head at every prompt and completion position. While the weights are unchanged (until the first optimizer
step after the rollout: GRPO / RLOO / REINFORCE with one iteration, PPO's first mini-batch), the training
forward (`replay`) runs the same blocks with autograd, but each linear layer hands back its recorded output
instead of multiplying (`_SavedLinear`, whose backward is the ordinary one). Only the elementwise work
(layer norms, activations, attention, residuals) is recomputed; the forward's matmuls, about a third of
the FLOPs of a training step, are not. A layer whose linear outputs are all recorded goes further
(`_lean_block`, GPT-2 and Llama): its forward only adds the recorded output projections to the residual
stream, and the backward recomputes the norms, the attention and the activation where it needs them, so
the activations kept between forward and backward are the residual stream's (about a third of the
per-op replay's in tests/test_replay.py). The gradients are those of the decoder's forward, equal to
those of a fresh forward to float rounding (tests/test_replay.py). It costs memory: every linear output of
the whole batch is kept until the update (`rollout.replay_max_mb` caps it).
"""
from __future__ import annotations

import ctypes
import os
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

from rlhfkit.accel import native
from rlhfkit.accel.activations import gelu, gelu_tanh_and_backward_, gelu_tanh_backward, gelu_tanh_forward
from rlhfkit.accel.native import bias_gelu_tanh_, bias_kv_, bias_residual_, native_ok
from rlhfkit.utils import weights

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _gpt2_ok(cfg) -> bool:
    return (cfg.activation_function in _GELU and getattr(cfg, "scale_attn_weights", True)
            and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(cfg, "reorder_and_upcast_attn", False)
            and not getattr(cfg, "add_cross_attention", False))


def supported(model: torch.nn.Module) -> bool:
    """True if `model` is a plain GPT-2 or Llama causal LM whose forward we reproduce exactly."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        return _gpt2_ok(cfg)
    if name == "LlamaForCausalLM":
        return (cfg.hidden_act == "silu" and getattr(cfg, "pretraining_tp", 1) == 1
                and not getattr(cfg, "mlp_bias", False))
    return False


class _SavedLinear(torch.autograd.Function):
    """A linear layer whose output `y` is already known (recorded by the decoder with the same weights):
    forward hands it back without multiplying; backward is the ordinary one. conv1d: y = x @ weight + bias
    (GPT-2's Conv1D, weight (in, out)); else y = x @ weight.T + bias (nn.Linear). x is (N, n, in), y
    (N, n, out) and may be a strided view (a micro-batch's rows of a time-major record): it is not copied."""

    @staticmethod
    def forward(ctx, x, weight, bias, y, conv1d):
        ctx.save_for_backward(x, weight)
        ctx.conv1d, ctx.has_bias = conv1d, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _linear_grads(x, w, dy, ctx.conv1d, (need[0], need[1], ctx.has_bias and need[2]))
        return grads + (None, None)


def _linear_grads(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, conv1d: bool, need: tuple[bool, ...]
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias) of y = linear(x) (as _linear: x (N, n, in), dy (N, n, out)); need[k] says
    whether the k-th of them is wanted (None where not)."""
    shape = x.shape
    x2, dy2 = x.reshape(-1, x.size(-1)), dy.reshape(-1, dy.size(-1))
    dx = (dy2 @ w.t() if conv1d else dy2 @ w).view(shape) if need[0] else None
    dw = (x2.t() @ dy2 if conv1d else dy2.t() @ x2) if need[1] else None
    db = dy2.sum(0) if need[2] else None
    return dx, dw, db


class _NormSavedLinear(torch.autograd.Function):
    """linear(layer_norm(x)) whose output `y` was recorded (GPT-2's c_attn and c_fc in replay): forward hands
    y back and keeps only x; backward recomputes the norm (one cheap pass). Autograd would keep the norm's
    (rows, D) output from the forward to the backward instead."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, weight, bias, y, eps, conv1d):
        ctx.save_for_backward(x, norm_w, norm_b, weight)
        ctx.eps, ctx.conv1d, ctx.has_bias = eps, conv1d, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, nw, nb, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        D = x.size(-1)
        h, mean, rstd = torch.native_layer_norm(x, (D,), nw, nb, ctx.eps)
        dh, dw, db = _linear_grads(h, w, dy, ctx.conv1d, (True, need[3], ctx.has_bias and need[4]))
        del h
        dx, dnw, dnb = torch.ops.aten.native_layer_norm_backward(dh, x, (D,), mean, rstd, nw, nb,
                                                                 [need[0], need[1], need[2]])
        return dx, dnw, dnb, dw, db, None, None, None


class _GeluSavedLinear(torch.autograd.Function):
    """linear(gelu(h)) whose output `y` was recorded (GPT-2's MLP down-projection in replay), h being the
    recorded up-projection: forward hands y back and computes nothing; backward computes gelu(h) for the
    weight's gradient. Autograd would run the GELU in the forward and keep its (rows, 4 D) output, the
    largest activation of the block, until the backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, approximate, conv1d):
        ctx.save_for_backward(h, weight)
        ctx.approximate, ctx.conv1d, ctx.has_bias = approximate, conv1d, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        h, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        tanh = ctx.approximate == "tanh"
        if tanh and need[0]:  # h's gradient first, then gelu(h) and gelu'(h) in one pass of ours
            dy2 = dy.reshape(-1, dy.size(-1))
            dh = (dy2 @ w.t() if ctx.conv1d else dy2 @ w).view(h.shape)
            g = gelu_tanh_and_backward_(h, dh)
            if g is None:  # where our kernels do not apply: the two passes
                g = gelu_tanh_forward(h)
                dh = gelu_tanh_backward(dh, h, out=dh)
            _, dw, db = _linear_grads(g, w, dy, ctx.conv1d, (False, need[1], ctx.has_bias and need[2]))
            return dh, dw, db, None, None, None
        g = gelu_tanh_forward(h) if tanh else F.gelu(h, approximate=ctx.approximate)
        dg, dw, db = _linear_grads(g, w, dy, ctx.conv1d, (need[0], need[1], ctx.has_bias and need[2]))
        del g
        if need[0]:  # (the exact GELU) in place: dg becomes dh
            torch.ops.aten.gelu_backward.grad_input(dg, h, approximate=ctx.approximate, grad_input=dg)
        return dg, dw, db, None, None, None


class _PreSavedLinears(torch.autograd.Function):
    """Linear layers of one input h = pre(*inputs), each of whose outputs was recorded: forward hands the
    recorded outputs back and keeps only the inputs (views of the record or the residual stream); backward
    recomputes h with autograd, runs the layers' backward and back-propagates through pre. Used for the
    attention before its output projection (GPT-2 and Llama) and, for Llama, the RMS norms before the
    q/k/v and gate/up projections and the SwiGLU before the down-projection. Autograd would keep h (and
    whatever pre made on the way) from the forward to the backward.

    apply(pre, n_in, conv1d, *inputs (n_in tensors), *(weight, bias, y) per layer) -> the y's (a tuple if
    more than one)."""

    @staticmethod
    def forward(ctx, pre, n_in, conv1d, *args):
        inputs, layers = args[:n_in], args[n_in:]
        ws, ys = layers[0::3], layers[2::3]
        ctx.save_for_backward(*inputs, *ws)
        ctx.pre, ctx.n_in, ctx.conv1d = pre, n_in, conv1d
        ctx.has_bias = [bias is not None for bias in layers[1::3]]
        return ys if len(ys) > 1 else ys[0]

    @staticmethod
    def backward(ctx, *dys):
        saved = ctx.saved_tensors
        inputs, ws = saved[:ctx.n_in], saved[ctx.n_in:]
        need = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(r) for t, r in zip(inputs, need)]
            h = ctx.pre(*ins)
        dh, layer_grads = None, []
        for j, (w, dy) in enumerate(zip(ws, dys)):
            at = ctx.n_in + 3 * j
            if dy is None:
                layer_grads += [None, None, None]
                continue
            need_j = (True, need[at], ctx.has_bias[j] and need[at + 1])
            dx, dw, db = _linear_grads(h.detach(), w, dy, ctx.conv1d, need_j)
            dh = dx if dh is None else dh.add_(dx)
            layer_grads += [dw, db, None]
        wanted = [t for t in ins if t.requires_grad]
        grads = iter(torch.autograd.grad(h, wanted, dh) if wanted and dh is not None else ())
        in_grads = [next(grads, None) if t.requires_grad else None for t in ins]
        return (None, None, None, *in_grads, *layer_grads)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      gqa: bool) -> torch.Tensor:
    """Causal self-attention of a prompt pass: q (N, H, m, hd) are the last m of the n positions of k, v
    (m < n where only the last positions go on: `keep` of _blocks); mask (N, 1, n, n) the causal mask
    with the padding (_prompt_masks), None without padding."""
    m, n = q.size(2), k.size(2)
    if m < n:  # query rows n - m .. n - 1 of the causal mask (SDPA's is_causal aligns them to the top)
        mask = (torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if mask is None else mask)[..., n - m:, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and m == n,
                                          enable_gqa=gqa)


def _qkv_heads(qkv: torch.Tensor, H: int, time_major: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v (rows, H, positions, hd) as views of GPT-2's q|k|v projection output qkv (rows, positions,
    3 D), or (positions, rows, 3 D) if time_major."""
    a, b, width = qkv.shape
    t = qkv.view(a, b, 3, H, width // (3 * H))
    return t.permute(2, 1, 3, 0, 4).unbind(0) if time_major else t.permute(2, 0, 3, 1, 4).unbind(0)


def _heads_out(o: torch.Tensor, H: int, time_major: bool) -> torch.Tensor:
    """The (rows, H, positions, hd) view of an attention output o (rows, positions, D) or, time-major,
    (positions, rows, D): the layout the output projection reads."""
    a, b, D = o.shape
    t = o.view(a, b, H, D // H)
    return t.permute(1, 2, 0, 3) if time_major else t.transpose(1, 2)


def _attention_forward(qkv, k1, v1, key_ok, H, m, G, time_major) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of our attention kernel on qkv (see _Attention): o in qkv's layout, lse (rows, H, m)."""
    q, k2, v2 = _qkv_heads(qkv, H, time_major)
    q = q[:, :, q.size(2) - m:]
    a, b, width = qkv.shape
    o = qkv.new_empty((m, b, width // 3) if time_major else (a, m, width // 3))
    lse = native.attention_forward(q, k2, v2, k1, v1, key_ok, G, q.size(-1) ** -0.5, _heads_out(o, H, time_major))
    return o, lse


def _attention_backward(qkv, k1, v1, key_ok, H, m, G, time_major, o, lse, do, pre=None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradients (of qkv whole, and of the prefix's keys and values) of _attention_forward's o, given
    its gradient do (o's layout). pre: the prefix's own q|k|v output (U, n1, 3 D), of which k1 and v1 are
    views: then the prefix's gradient comes as pre's whole (its query part 0) in place of the second
    entry, and None in the third, so autograd adds it to pre's other gradient without a stack."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    q, k2, v2 = _qkv_heads(qkv, H, time_major)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype)
    dq, dk2, dv2 = _qkv_heads(dqkv, H, time_major)
    n = q.size(2)
    if m < n:  # queries at the last m positions only: the others' query gradient is 0
        dq[:, :, :n - m].zero_()
    dk1 = dv1 = dpre = None
    if pre is not None:
        dpre = torch.empty(pre.shape, dtype=pre.dtype)
        dq1, dk1, dv1 = _qkv_heads(dpre, H, False)
        dq1.zero_()
    elif k1 is not None:
        dk1, dv1 = torch.empty(k1.shape, dtype=k1.dtype), torch.empty(v1.shape, dtype=v1.dtype)
    native.attention_backward(q[:, :, n - m:], k2, v2, k1, v1, key_ok, G, q.size(-1) ** -0.5,
                              _heads_out(o, H, time_major), lse, _heads_out(do, H, time_major), dq[:, :, n - m:],
                              dk2, dv2, dk1, dv1)
    return (dqkv, dpre, None) if pre is not None else (dqkv, dk1, dv1)


class _Attention(torch.autograd.Function):
    """GPT-2's attention straight from its q|k|v projection output, with our kernels
    (native.attention_forward / _backward): the queries are the last m positions of qkv, the keys an
    optional prefix (k1, v1: (U, H, n1, hd), shared by each G consecutive rows: a prompt's, for its
    completions) followed by qkv's own, causal, with key_ok (rows, n1 + n2) masking pad keys. The output
    comes in qkv's layout ((rows, m, D), or (m, rows, D) time-major), ready for the output projection, and
    the backward writes the gradient of qkv whole (the q, k and v parts, in place) instead of three
    zero-filled gradients that autograd then stacks, and without the cat of prefix and own keys.

    apply(qkv, k1, v1, key_ok, H, m, G, time_major) -> o"""

    @staticmethod
    def forward(ctx, qkv, k1, v1, key_ok, H, m, G, time_major):
        o, lse = _attention_forward(qkv, k1, v1, key_ok, H, m, G, time_major)
        ctx.save_for_backward(qkv, k1, v1, key_ok, o, lse)
        ctx.args = (H, m, G, time_major)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, k1, v1, key_ok, o, lse = ctx.saved_tensors
        return (*_attention_backward(qkv, k1, v1, key_ok, *ctx.args, o, lse, do), None, None, None, None, None)


class _ProjectedAttention(torch.autograd.Function):
    """The output projection of _Attention's output, recorded (replay's lean GPT-2 blocks): forward hands
    the recorded projection output y back and keeps qkv (and the prefix's keys and values); backward runs
    the attention forward again, the projection's gradients and the attention's backward, the three in a
    row (what _PreSavedLinears does for other attentions through a second autograd pass).

    With the attention's output o (qkv's layout) and log-sum-exp lse (rows, H, m) recorded too (the
    rollout's, Record.attn_*), the backward does not run the attention's forward at all.

    The prefix (k1, v1) may come with its own q|k|v output `pre` (the prompt pass's), of which the two are
    views: then pre takes the prefix's gradient whole (_attention_backward).

    apply(qkv, k1, v1, weight, bias, y, key_ok, H, m, G, time_major, o=None, lse=None, pre=None) -> y"""

    @staticmethod
    def forward(ctx, qkv, k1, v1, weight, bias, y, key_ok, H, m, G, time_major, o=None, lse=None, pre=None):
        ctx.save_for_backward(qkv, k1, v1, weight, key_ok, o, lse, pre)
        ctx.args, ctx.has_bias = (H, m, G, time_major), bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        qkv, k1, v1, w, key_ok, o, lse, pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        if o is None:
            o, lse = _attention_forward(qkv, k1, v1, key_ok, *ctx.args)
        do, dw, db = _linear_grads(o, w, dy, True, (True, need[3], ctx.has_bias and need[4]))
        dqkv, d1, d2 = _attention_backward(qkv, k1, v1, key_ok, *ctx.args, o, lse, do, pre)
        if pre is not None:  # the prefix's gradient as pre's
            return dqkv, None, None, dw, db, None, None, None, None, None, None, None, None, d1
        return dqkv, d1, d2, dw, db, None, None, None, None, None, None, None, None, None


def _fused_attention_ok(like: torch.Tensor, hd: int) -> bool:
    """_Attention applies: our kernels are on, float32 CPU weights, a head width they take."""
    return native_ok(like) and native.attention_width_ok(hd)


def _byte_mask(key_ok: torch.Tensor | None) -> torch.Tensor | None:
    """key_ok as our kernels read it: bytes with contiguous rows (a bool mask is one)."""
    if key_ok is not None and (key_ok.dtype != torch.bool or key_ok.stride(-1) != 1):
        key_ok = key_ok.to(torch.bool).contiguous()
    return key_ok


def fused_attention(qkv: torch.Tensor, H: int, m: int, key_ok: torch.Tensor | None = None,
                    prefix: tuple[torch.Tensor, torch.Tensor] | None = None, G: int = 1,
                    time_major: bool = False) -> torch.Tensor:
    """_Attention.apply (key_ok: any (rows, keys) mask)."""
    k1, v1 = prefix if prefix is not None else (None, None)
    return _Attention.apply(qkv, k1, v1, _byte_mask(key_ok), H, m, G, time_major)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, n, in) -> (N, n, out): GPT-2's Conv1D (weight (in, out)) or nn.Linear; into `out` (a
    contiguous (N * n, out) buffer) if given."""
    N, n, _ = x.shape
    x2 = x.reshape(N * n, -1)
    if out is None:
        y = torch.addmm(bias, x2, weight) if conv1d else F.linear(x2, weight, bias)
    else:
        w = weight if conv1d else weight.t()
        y = torch.mm(x2, w, out=out) if bias is None else torch.addmm(bias, x2, w, out=out)
    return y.view(N, n, -1)


def _fused_gelu_ok(like: torch.Tensor) -> bool:
    """oneDNN's linear with a fused GELU is there (CPU, float32, torch built with it)."""
    return (like.device.type == "cpu" and like.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _fused_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x @ weight + bias) for GPT-2's Conv1D weight (in, out), x (N, n, in), no gradients: torch's
    matmul, then bias + GELU in one pass of ours (the tanh-GELU) where our kernels are built, else oneDNN's
    linear with the GELU inside (torch's own tanh-GELU kernel is several times slower than either). Equal
    to the unfused ops to float rounding."""
    N, n, _ = x.shape
    x2 = x.reshape(N * n, -1)
    if approximate == "tanh" and native_ok(x2, weight, bias):
        return bias_gelu_tanh_(torch.mm(x2, weight), bias).view(N, n, -1)
    y = torch.ops.mkldnn._linear_pointwise(x2, weight.t(), bias, "gelu", [], approximate)
    return y.view(N, n, -1)


class _LinearGeluTanh(torch.autograd.Function):
    """gelu_tanh(x @ weight + bias) for GPT-2's Conv1D weight (in, out), x (rows, in), with gradients, on our
    kernels: the product without its bias, then bias + GELU in one pass (bias_gelu_tanh_, which leaves the
    pre-activation in place for the backward), instead of addmm (which first copies the bias into every
    row of the output) and a separate GELU; the backward's GELU pass also sums the bias's gradient
    (gelu_tanh_backward_colsum) instead of a separate pass over the rows."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = torch.mm(x, weight)
        g = bias_gelu_tanh_(y, bias)  # y += bias: the pre-activation
        ctx.save_for_backward(x, weight, y)
        return g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dg):
        x, w, y = ctx.saved_tensors
        both = native.gelu_tanh_backward_colsum(dg.contiguous(), y)
        if both is None:
            dy = gelu_tanh_backward(dg, y)
            both = dy, dy.sum(0)
        dy, db = both
        need = ctx.needs_input_grad
        return (dy @ w.t() if need[0] else None), (x.t() @ dy if need[1] else None), (db if need[2] else None)


def _linear_gelu_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x @ weight + bias), x (N, n, in), through _LinearGeluTanh where it applies (tanh-GELU, our
    kernels, float32 on CPU), else torch's ops; with gradients."""
    N, n, _ = x.shape
    if approximate == "tanh" and native_ok(x, weight, bias) and x.is_contiguous():
        return _LinearGeluTanh.apply(x.reshape(N * n, -1), weight, bias).view(N, n, -1)
    return gelu(_linear(x, weight, bias, True), approximate)


def head_logits(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """The LM head on h (N, n, D) for replay: its recorded logits y (viewed (N, n, V)) if any."""
    if y is None:
        return F.linear(h, weight, bias)
    return _SavedLinear.apply(h, weight, bias, y.view(*h.shape[:2], y.size(-1)), False)


class Record:
    """The outputs of every linear layer (and the LM head) of one rollout's forward, for `replay`.

    prompt[i][j]: (U * P, F_j), the j-th linear of block i at the unique prompts' positions (the prefill);
    comp[i][j]: (max_new - 1, B, F_j), at the completion tokens fed back, time-major so that decode step s
    writes its output straight into comp[i][j][s]; first: (U, V) logits of the prompts' last position;
    logits: (max_new - 1, B, V) of the steps. The buffers are made before decoding (outside inference
    mode: they feed autograd later). Valid for the model it was recorded with while its weights are
    unchanged: no optimizer step and no load since (`usable`, by utils/weights.py's stamp)."""

    def __init__(self, model: torch.nn.Module, dec: _Base, U: int, G: int, P: int, max_new: int,
                 budget_mb: float, reuse: Record | None = None) -> None:
        """Records the layers `plan` picks for budget_mb. `reuse`: a record no longer needed (an earlier
        rollout's): its memory is taken over if large enough, and it stops being usable."""
        like = dec.weight_like
        B, n = U * G, max(max_new - 1, 0)
        self.model, self.stamp, self.root, self.released = model, weights.stamp(model), self, False
        self.U, self.G, self.P, self.s, self.n = U, G, P, -1, 0
        self.keep, self.keep_logits, need = self.plan(dec, U, G, P, max_new, budget_mb)
        # The attention's output and log-sum-exp at every position of each fully recorded GPT-2 layer, as
        # the budget allows: replay's backward then does not run the attention's forward again
        # (_ProjectedAttention). attn_ok turns False if a pass could not write them (a decode step not in
        # our one-call kernel).
        H = getattr(dec, "H", 0)
        self.attn_ok = isinstance(dec, GPT2Decoder) and _fused_attention_ok(like, dec.hd)
        per_layer = (U * P + B * n) * (getattr(dec, "D", 0) + H)
        budget = budget_mb * 2**20 / like.element_size()
        self.keep_attn = []
        for keep in self.keep:
            k = self.attn_ok and all(keep) and need + per_layer <= budget
            need += per_layer if k else 0
            self.keep_attn.append(k)
        flat = reuse.release() if reuse is not None else None
        if flat is None or flat.numel() < need or flat.dtype != like.dtype or flat.device != like.device:
            flat = like.new_empty(need)
        self.flat, at = flat, 0

        def carve(keep: bool, *shape: int) -> torch.Tensor | None:
            nonlocal at
            if not keep:
                return None
            size = 1
            for d in shape:
                size *= d
            at += size
            return flat[at - size:at].view(shape)

        self.prompt = [[carve(k, U * P, f) for k, f in zip(keep, dec.widths)] for keep in self.keep]
        self.comp = [[carve(k, n, B, f) for k, f in zip(keep, dec.widths)] for keep in self.keep]
        self.first = carve(self.keep_logits, U, dec.vocab)
        self.logits = carve(self.keep_logits, n, B, dec.vocab)
        self.attn_prompt = [carve(k, U * P, dec.D) for k in self.keep_attn]  # (U * P, D), (U, H, P)
        self.lse_prompt = [carve(k, U, H, P) for k in self.keep_attn]
        self.attn_comp = [carve(k, n, B, dec.D) for k in self.keep_attn]      # (n, B, D), (n, B, H)
        self.lse_comp = [carve(k, n, B, H) for k in self.keep_attn]

    @staticmethod
    def plan(dec: _Base, U: int, G: int, P: int, max_new: int, budget_mb: float
             ) -> tuple[list[list[bool]], bool, int]:
        """Which outputs to keep within budget_mb: (keep[i][j], keep the LM head's, floats in all). The
        most matmul work saved per byte first (a layer's FLOPs per output value are its input width:
        e.g. GPT-2's MLP down-projection saves 4x as much per byte as the others), then in layer order."""
        steps = U * G * max(max_new - 1, 0)
        cands = [(dec.fan_in[j], i, j, (U * P + steps) * f) for i in range(dec.L) for j, f in enumerate(dec.widths)]
        cands.append((dec.D, dec.L, 0, (U + steps) * dec.vocab))  # the LM head
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        budget = budget_mb * 2**20 / dec.weight_like.element_size()
        keep = [[False] * len(dec.widths) for _ in range(dec.L)]
        keep_logits, total = False, 0
        for _, i, j, floats in cands:
            if total + floats > budget:
                continue
            total += floats
            if i == dec.L:
                keep_logits = True
            else:
                keep[i][j] = True
        return keep, keep_logits, total

    def release(self) -> torch.Tensor | None:
        """Make this record (and every row subset of it) unusable; returns its memory for reuse."""
        root = self.root
        root.released = True
        flat, root.flat = root.flat, None
        return flat

    def out(self, i: int, j: int) -> torch.Tensor | None:
        """Where the j-th linear of block i writes its output now (prefill, or decode step s); None if
        that layer is not recorded."""
        t = self.prompt[i][j] if self.s < 0 else self.comp[i][j]
        return t if t is None or self.s < 0 else t[self.s]

    def out_logits(self) -> torch.Tensor | None:
        return self.first if self.s < 0 or self.logits is None else self.logits[self.s]

    def usable(self, model: torch.nn.Module) -> bool:
        """True while `model` is the recorded one, unchanged, and gradients are being recorded."""
        return (not self.root.released and model is self.model and torch.is_grad_enabled()
                and weights.stamp(model) == self.stamp)

    def rows(self, idx: slice | torch.Tensor, group: int) -> Record:
        """The record of some rows (as Rollout.rows: `group` is the sub-rollout's group size, the
        current one for a slice of whole groups, else 1 and every row gets its own prompt entries)."""
        out = object.__new__(Record)
        out.__dict__.update(self.__dict__)
        B = self.U * self.G
        if isinstance(idx, slice) and group == self.G:
            start, stop, _ = idx.indices(B)
            pidx = slice(start // self.G, stop // self.G)
            out.U = (stop - start) // self.G
        else:
            rows = torch.arange(B)[idx]
            pidx, idx = rows // self.G, rows
            out.U, out.G = rows.numel(), 1
        P = self.P

        def prompt_rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.view(-1, P, t.size(-1))[pidx].reshape(-1, t.size(-1))

        out.prompt = [[prompt_rows(t) for t in layer] for layer in self.prompt]
        out.comp = [[None if t is None else t[:, idx] for t in layer] for layer in self.comp]
        out.attn_prompt = [prompt_rows(t) for t in self.attn_prompt]
        out.lse_prompt = [None if t is None else t[pidx] for t in self.lse_prompt]
        out.attn_comp = [None if t is None else t[:, idx] for t in self.attn_comp]
        out.lse_comp = [None if t is None else t[:, idx] for t in self.lse_comp]
        if self.keep_logits:
            out.first, out.logits = self.first[pidx], self.logits[:, idx]
        return out

    def replay(self, ro) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits with gradients for rollout `ro` (whose rows this record holds): (B, 1, V) of the first
        completion token and (B, C - 1, V) of the rest, from the recorded outputs (module docstring)."""
        if ro.completion_ids.size(1) - 1 != self.n:
            raise ValueError(f"record of {self.n + 1} completion tokens, rollout of {ro.completion_ids.size(1)}")
        return make_fast_decoder(self.model).replay(ro, self)


class _Base:
    """Cache bookkeeping shared by both architectures."""

    rec: Record | None = None
    lean = True  # replay fully recorded layers with _lean_block (off: per op, as a partly recorded layer)

    def __init__(self, n_layer: int, n_kv: int, head_dim: int) -> None:
        self.L, self.Hkv, self.hd = n_layer, n_kv, head_dim
        self.weights_of = None  # the module whose weights stamp says when the decoded weights change

    def _alloc(self, B: int, T: int, like: torch.Tensor) -> None:
        """The KV cache, time-major: KV[layer, slot, 0 = keys / 1 = values] is one (B, Hkv, hd) block, so a
        decode step writes two contiguous blocks, and a layer's keys over slots 0..t are a (B * Hkv, t + 1,
        hd) view that bmm reads in place (_attend_step)."""
        self.KV = like.new_empty((self.L, T, 2, B, self.Hkv, self.hd))

    def _prompt_masks(self, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor | None:
        """Positions (U, P), and the key mask over the whole cache (B, P + max_new) if there is padding."""
        self.pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (U, P) positions of real tokens
        self.next_pos = mask.long().sum(-1).repeat_interleave(repeat)  # (B,) position of the next token
        self.t = mask.size(1)  # cache slot of the next token
        if bool(mask.all()):
            self.key_ok = None
            return None
        B = mask.size(0) * repeat
        key_ok = torch.ones(B, mask.size(1) + max_new, dtype=torch.bool, device=mask.device)
        key_ok[:, :mask.size(1)] = mask.bool().repeat_interleave(repeat, 0)
        self.key_ok = key_ok
        # Prefill mask (U, 1, P, P): causal, real keys only, and the diagonal (pad queries see themselves).
        P = mask.size(1)
        causal = torch.ones(P, P, dtype=torch.bool, device=mask.device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=mask.device)
        return ((causal & mask.bool()[:, None, :]) | eye)[:, None]

    def _store_prompt_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, repeat: int) -> None:
        """k, v (U, Hkv, P, hd) of the unique prompts into slots 0..P-1 of all U * repeat rows."""
        U, _, P, hd = k.shape
        for j, x in enumerate((k, v)):  # (P, U, repeat, Hkv, hd) <- (P, U, 1, Hkv, hd), broadcast
            self.KV[i, :P, j].view(P, U, repeat, self.Hkv, hd).copy_(x.permute(2, 0, 1, 3)[:, :, None])

    def _attend_step(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k, v (B, Hkv, 1, hd) into slot t and attend over slots 0..t.

        Two batched matmuls straight on the time-major cache, not scaled_dot_product_attention: with one
        query per row, SDPA's CPU kernel first copies the strided keys and values, and the step costs
        about a third more (B=64, 4 heads, 48 slots). The rep = H / Hkv query heads that share a key head
        (GQA) are one (rep, hd) block against that head's keys."""
        self.KV[i, self.t, 0].copy_(k[:, :, 0])
        self.KV[i, self.t, 1].copy_(v[:, :, 0])
        return self._attend_cached(i, q)

    def _attend_cached(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """q (B, H, 1, hd) against layer i's keys and values in slots 0..t (this step's written)."""
        t = self.t
        B, H, _, hd = q.shape
        keys = self.KV[i, :t + 1, 0].view(t + 1, B * self.Hkv, hd).transpose(0, 1)  # (B*Hkv, t+1, hd) views
        vals = self.KV[i, :t + 1, 1].view(t + 1, B * self.Hkv, hd).transpose(0, 1)
        s = torch.bmm(q.reshape(B * self.Hkv, H // self.Hkv, hd), keys.transpose(1, 2))  # (B*Hkv, rep, t+1)
        s.mul_(hd ** -0.5)
        if self.key_ok is not None:
            s.view(B, -1, t + 1).masked_fill_(~self.key_ok[:, None, :t + 1], float("-inf"))
        return torch.bmm(torch.softmax(s, -1), vals).view(B, H, 1, hd)

    def record(self, model: torch.nn.Module, U: int, G: int, P: int, max_new: int, budget_mb: float,
               reuse: Record | None = None) -> Record:
        """Keep the outputs of the coming start() and step()s (for Record.replay)."""
        self.rec = Record(model, self, U, G, P, max_new, budget_mb, reuse)
        return self.rec

    def _begin_step(self) -> None:
        if self.rec is not None:
            self.rec.s = self.t - self.rec.P
            self.rec.n = self.rec.s + 1

    def _lin(self, i: int, j: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The j-th linear layer of block i on x (N, n, in); written into the record if it keeps this one
        (at the last positions of each prompt's rows if the prefill keeps only those: _blocks' keep)."""
        out = None if self.rec is None else self.rec.out(i, j)
        N, n, _ = x.shape
        if out is not None and out.size(0) != N * n:
            y = _linear(x, weight, bias, self.conv1d)
            out.view(N, -1, out.size(-1))[:, -n:].copy_(y)
            return y
        return _linear(x, weight, bias, self.conv1d, out)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of h (B, D), into the record if it keeps the LM head's."""
        out = None if self.rec is None else self.rec.out_logits()
        return _linear(h[None], self.lm_head.weight, self.lm_head.bias, False, out)[0]

    # Replay -----------------------------------------------------------------------------------------
    def replay(self, ro, rec: Record, cache: PromptCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward of rollout `ro` from record `rec` (see the module docstring). The
        completions run time-major, (C - 1, B), the layout the decoder recorded them in. `cache`: a plain
        forward (nothing recorded, no gradients) takes the prompts' half from it where it has them."""
        G, comp = ro.group_size, ro.completion_ids
        B, C = comp.shape
        n = C - 1
        u_ids, u_mask = ro.prompt_ids[::G], ro.prompt_mask[::G]
        P = u_ids.size(1)
        pmask = self._prompt_masks(u_mask, G, n)

        plain = isinstance(rec, _NoRecord) and not torch.is_grad_enabled()

        def saved(part: list, shape: tuple[int, int]) -> callable:
            def lin(i, j, x, weight, bias):
                y = part[i][j]
                if y is None:  # not recorded
                    return _linear(x, weight, bias, self.conv1d)
                y = y.view(*shape, y.size(-1))[:, shape[1] - x.size(1):]  # the last positions (keep) only
                return _SavedLinear.apply(x, weight, bias, y, self.conv1d)
            if plain and self.conv1d and _fused_gelu_ok(self.weight_like):
                lin.gelu = _fused_linear_gelu  # a plain no-grad forward: GPT-2's MLP input + GELU in one op
            elif torch.is_grad_enabled() and self.lean:
                lin.lean = lambda i: all(t is not None for t in part[i])
                lin.out = lambda i, j: part[i][j].view(*shape, part[i][j].size(-1))
            return lin

        fused = isinstance(self, GPT2Decoder) and _fused_attention_ok(self.weight_like, self.hd)
        attn_recorded = fused and getattr(rec, "attn_ok", False) and torch.is_grad_enabled()
        prompt_qkv_of: dict[int, torch.Tensor] = {}  # layer -> the lean prompt pass's q|k|v output

        def prompt_pass(ids, pos, pm, lin, ok=None):
            """The prompts' forward: each layer's keys and values (each unique prompt's once: the completions'
            attention repeats them) and the final-normed last position (N, 1, D). ok: the prompts' key
            mask (N, P) where they are padded (pm, the same as an attention mask)."""
            kv, ok = [], _byte_mask(ok)

            def prompt_attention(q, k, v):
                return _causal_attention(q, k, v, pm, self.gqa)

            def attend_prompt(i, q, k, v):
                kv.append((k, v))
                return prompt_attention(q, k, v)

            def prompt_lean(i, q, k, v, rope=None):
                # The completions attend to the prompt's keys as attention sees them (rotated, for Llama).
                kv.append((k if rope is None else rope(k), v))
                return prompt_attention, (q, k, v)

            attend_prompt.lean = prompt_lean
            if fused:
                def prompt_qkv(i, qkv, m):
                    kv.append(_qkv_heads(qkv, self.H, False)[1:])
                    return fused_attention(qkv, self.H, m, ok)

                attend_prompt.qkv = prompt_qkv
                def prompt_lean_qkv(i, qkv, m):
                    """_ProjectedAttention's (k1, v1, key_ok, queries, G, time_major, o, lse, pre)."""
                    kv.append(_qkv_heads(qkv, self.H, False)[1:])
                    prompt_qkv_of[i] = qkv  # the completions' prefix gradient goes to it whole
                    o = lse = None
                    if attn_recorded and rec.attn_prompt[i] is not None:  # the prefill's, at the last m positions
                        o = rec.attn_prompt[i].view(-1, P, self.D)[:, P - m:]
                        lse = rec.lse_prompt[i][:, :, P - m:].contiguous()
                    return None, None, ok, m, 1, False, o, lse, None

                attend_prompt.lean_qkv = prompt_lean_qkv
            # Only the last position goes on past the last layer's keys and values (keep=1).
            return kv, self._final_norm(self._forward(ids, pos, attend_prompt, lin, keep=1)[:, -1:])

        # Completion queries see every (real) prompt key and the completion keys up to their own.
        cmask = None
        if not fused:  # _Attention builds none
            cmask = torch.ones(n, P + n, dtype=torch.bool, device=comp.device)
            cmask[:, P:] = torch.ones(n, n, dtype=torch.bool, device=comp.device).tril()
            if self.key_ok is not None:
                cmask = cmask & self.key_ok[:, None, None, :P + n]

        def completion_attention(q, k, v, kp, vp):  # time-major (n, H, B, hd) in and out; kp, vp per prompt
            if G > 1:
                kp, vp = kp.repeat_interleave(G, 0), vp.repeat_interleave(G, 0)
            q, k, v = (t.permute(2, 1, 0, 3) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2),
                                               attn_mask=cmask, enable_gqa=self.gqa)
            return o.permute(2, 1, 0, 3)

        def attend_completion(i, q, k, v):
            return completion_attention(q, k, v, *kv[i])

        attend_completion.lean = lambda i, q, k, v, rope=None: (completion_attention, (q, k, v, *kv[i]))
        if fused:  # the prompts' keys as a prefix shared by each G rows: no repeat, no cat
            c_ok = None if self.key_ok is None else _byte_mask(self.key_ok[:, :P + n])

            def completion_qkv(qkv, kp, vp):
                return fused_attention(qkv, self.H, n, c_ok, (kp, vp), G, time_major=True)

            attend_completion.qkv = lambda i, qkv, m: completion_qkv(qkv, *kv[i])
            def completion_lean_qkv(i, qkv, m):  # every step's queries; the decode steps' o and lse
                o = lse = None
                if attn_recorded and rec.attn_comp[i] is not None:
                    o, lse = rec.attn_comp[i][:n], rec.lse_comp[i][:n].permute(1, 2, 0).contiguous()
                pre = prompt_qkv_of.get(i)
                k1, v1 = kv[i] if pre is None else (t.detach() for t in kv[i])  # pre's views: its gradient
                return k1, v1, c_ok, n, G, True, o, lse, pre

            attend_completion.lean_qkv = completion_lean_qkv

        W, b = self.lm_head.weight, self.lm_head.bias
        U = u_ids.size(0)
        lin_prompt = saved(rec.prompt, (U, P))
        if cache is not None and plain:
            kv, h_first = cache.lookup(self.model, u_ids, u_mask, lambda r: prompt_pass(
                u_ids[r], self.pos[r], None if pmask is None else pmask[r], lin_prompt,
                None if pmask is None else u_mask[r].bool()))
        else:
            kv, h_first = prompt_pass(u_ids, self.pos, pmask, lin_prompt, None if pmask is None else u_mask.bool())
        if n == 0:
            first = head_logits(h_first, rec.first, W, b)
            return (first.repeat_interleave(G, 0) if G > 1 else first), first[:, :0]
        pos_c = self.next_pos + torch.arange(n, device=comp.device)[:, None]  # (n, B)
        x = self._forward(comp[:, :-1].t(), pos_c, attend_completion,
                          saved([[None if t is None else t[:n] for t in layer] for layer in rec.comp], (n, B)))
        h = self._final_norm(x)  # (n, B, D)
        if rec.first is None and rec.logits is None:  # both unrecorded: one matmul for both
            logits = F.linear(torch.cat([h_first.view(U, -1), h.view(n * B, -1)]), W, b)
            first, rest = logits.split([U, n * B])  # (split's backward is one cat: no zeros + adds)
            first, rest = first[:, None], rest.view(n, B, -1)
        else:
            first = head_logits(h_first, rec.first, W, b)
            rest = head_logits(h, None if rec.logits is None else rec.logits[:n], W, b)
        first = first.repeat_interleave(G, 0) if G > 1 else first
        return first, rest.transpose(0, 1)


class GPT2Decoder(_Base):
    conv1d = True
    cstep = None  # start()'s _c_step_args

    def __init__(self, model: torch.nn.Module) -> None:
        """model: a GPT2LMHeadModel, or a bare GPT2Model (a critic's backbone: no LM head)."""
        cfg = model.config
        super().__init__(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head)
        self.model, self.H, self.D = model, cfg.n_head, cfg.n_embd
        self.tr, self.lm_head = getattr(model, "transformer", model), getattr(model, "lm_head", None)
        self.gelu = _GELU[cfg.activation_function]
        self.gqa = False
        self.widths = [3 * self.D, self.D, cfg.n_inner or 4 * self.D, self.D]
        self.fan_in = [self.D, self.D, self.D, self.widths[2]]
        self.vocab = None if self.lm_head is None else self.lm_head.weight.size(0)
        self.weight_like = self.tr.wte.weight

    def _blocks(self, x: torch.Tensor, attend, lin, keep: int = 0) -> torch.Tensor:
        """x (N, n, D) through every block; attend(i, q, k, v) does the attention of layer i and
        lin(i, j, x (N, n, in), weight, bias) -> (N, n, out) its j-th linear layer. keep > 0: only the last
        `keep` positions are wanted, so the last block computes every position's keys and values but the
        rest of the block (queries, output projection, MLP) at those positions only, and returns
        (N, keep, D): the same values, without the work whose results nothing reads."""
        N, n, D = x.shape
        lean = getattr(lin, "lean", None)  # replay with gradients: layers whose every linear was recorded
        for i, blk in enumerate(self.tr.h):
            a, mlp = blk.attn, blk.mlp
            cut = keep if keep and i == self.L - 1 else 0
            if lean is not None and lean(i):
                x = self._lean_block(i, blk, x, attend, lin.out, cut)
                continue
            h = F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            qkv = lin(i, 0, h, a.c_attn.weight, a.c_attn.bias)
            if cut:
                x = x[:, n - cut:]
            fused = getattr(attend, "qkv", None)
            if fused is not None:  # _Attention, on qkv itself
                o = fused(i, qkv, x.size(1))
            else:
                q, k, v = _qkv_heads(qkv, self.H, False)  # (N, H, n, hd)
                o = attend(i, q[:, :, n - x.size(1):], k, v).transpose(1, 2).reshape(N, x.size(1), D)
            x = x + lin(i, 1, o, a.c_proj.weight, a.c_proj.bias)
            h = F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            fused = getattr(lin, "gelu", None)
            if fused is not None:
                h = fused(h, mlp.c_fc.weight, mlp.c_fc.bias, self.gelu)
            else:
                h = gelu(lin(i, 2, h, mlp.c_fc.weight, mlp.c_fc.bias), self.gelu)
            x = x + lin(i, 3, h, mlp.c_proj.weight, mlp.c_proj.bias)
        return x

    def _lean_block(self, i: int, blk: torch.nn.Module, x: torch.Tensor, attend, out, cut: int = 0) -> torch.Tensor:
        """Block i of a replay from a record of all four of its linear layers' outputs (out(i, j), (N, n, F)):
        nothing is multiplied, normalised or activated in the forward, which only adds the recorded outputs
        to the residual stream; the backward recomputes the norms, the attention and the GELU where it
        needs them (_NormSavedLinear, _PreSavedLinears, _GeluSavedLinear). The gradients are those of
        _blocks; the activation memory is the residual stream's only, so larger micro-batches fit. cut > 0:
        the last `cut` positions only past the keys and values (_blocks' keep)."""
        N, n, D = x.shape
        m = cut or n
        a, mlp, ln1, ln2 = blk.attn, blk.mlp, blk.ln_1, blk.ln_2
        qkv = _NormSavedLinear.apply(x, ln1.weight, ln1.bias, a.c_attn.weight, a.c_attn.bias, out(i, 0),
                                     ln1.eps, True)
        def last(t: torch.Tensor) -> torch.Tensor:
            return t[:, n - m:]

        fused = getattr(attend, "lean_qkv", None)
        if fused is not None:  # our attention on qkv itself (and a prefix's keys and values)
            k1, v1, key_ok, queries, G, time_major, o, lse, pre = fused(i, qkv, m)
            x = last(x) + _ProjectedAttention.apply(qkv, k1, v1, a.c_proj.weight, a.c_proj.bias, last(out(i, 1)),
                                                    key_ok, self.H, queries, G, time_major, o, lse, pre)
        else:
            q, k, v = _qkv_heads(qkv, self.H, False)  # (N, H, n, hd)
            fn, inputs = attend.lean(i, q[:, :, n - m:], k, v)

            def attn(*t: torch.Tensor) -> torch.Tensor:
                return fn(*t).transpose(1, 2).reshape(N, m, D)

            x = last(x) + _PreSavedLinears.apply(attn, len(inputs), True, *inputs,
                                                 a.c_proj.weight, a.c_proj.bias, last(out(i, 1)))
        h = _NormSavedLinear.apply(x, ln2.weight, ln2.bias, mlp.c_fc.weight, mlp.c_fc.bias, last(out(i, 2)),
                                   ln2.eps, True)
        return x + _GeluSavedLinear.apply(h, mlp.c_proj.weight, mlp.c_proj.bias, last(out(i, 3)), self.gelu, True)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, attend, lin, keep: int = 0) -> torch.Tensor:
        return self._blocks(self.tr.wte(ids) + self.tr.wpe(pos), attend, lin, keep)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        f = self.tr.ln_f
        return F.layer_norm(x, (self.D,), f.weight, f.bias, f.eps)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor:
        U, P = ids.shape
        self._alloc(U * repeat, P + max_new, self.tr.wte.weight)
        pmask = self._prompt_masks(mask, repeat, max_new)

        rec = self.rec
        ok = None if pmask is None else mask.bool().contiguous()

        def attend(i, q, k, v):
            self._store_prompt_kv(i, k, v, repeat)
            if rec is not None and rec.attn_prompt[i] is not None:
                if native.attention_ok(q, k, v):  # into the record: (U, H, m, hd) views of its (U, P, D)
                    m = q.size(2)
                    o = rec.attn_prompt[i].view(U, P, self.H, self.hd)[:, P - m:].transpose(1, 2)
                    rec.lse_prompt[i][:, :, P - m:] = native.attention_forward(q, k, v, None, None, ok, 1,
                                                                               self.hd ** -0.5, o)
                    return o
                rec.attn_ok = False
            return _causal_attention(q, k, v, pmask, False)

        # (U, D): the last prompt position, the only one the last block computes past its keys and values.
        # The record's last-block outputs at the other prompt positions stay unwritten: replay keeps the
        # last position there too.
        x = self._forward(ids, self.pos, attend, self._lin, keep=1)[:, -1]
        logits = self._head(self._final_norm(x))                   # predicts the first token
        self.cstep = self._c_step_args(U * repeat)
        return logits.repeat_interleave(repeat, 0) if repeat > 1 else logits

    def _c_step_args(self, B: int) -> native.Gpt2Step | None:
        """The arguments of our one-call decode step (rlhfkit_gpt2_step) for this rollout: pointers to the
        weights, the cache, the record's buffers and scratch space (kept alive here); None where it does
        not apply (no kernels or no sgemm to call, another activation, weights not contiguous float32)."""
        tensors = list(self.model.parameters())
        sgemm = native.sgemm_address()
        D, Fw, V, T = self.D, self.widths[2], self.vocab, self.KV.size(1)
        if (self.gelu != "tanh" or sgemm is None or self.lm_head is None or not native_ok(self.weight_like, *tensors)
                or not all(t.is_contiguous() for t in tensors) or T > self.tr.wpe.weight.size(0)):
            return None  # (positions past the table: torch's embedding raises the error)
        new = self.weight_like.new_empty
        self._scratch = [new(B, D), new(B, D), new(B, D), new(B, Fw), new(B * self.H, T)] + [
            new(B, w) for w in self.widths]
        rec = self.rec

        def p(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        layers = (native.Gpt2Layer * self.L)()
        for i, blk in enumerate(self.tr.h):
            a, mlp, lay = blk.attn, blk.mlp, layers[i]
            for name, t in (("ln1", blk.ln_1), ("ln2", blk.ln_2), ("attn", a.c_attn), ("proj", a.c_proj),
                            ("fc", mlp.c_fc), ("mproj", mlp.c_proj)):
                setattr(lay, name + "_w", p(t.weight))
                setattr(lay, name + "_b", p(t.bias))
            lay.eps1, lay.eps2 = blk.ln_1.eps, blk.ln_2.eps
            for j in range(4):
                lay.rec[j] = None if rec is None else p(rec.comp[i][j])
            lay.rec_o = None if rec is None else p(rec.attn_comp[i])
            lay.rec_lse = None if rec is None else p(rec.lse_comp[i])
        x, h, o, g, scores, *scr = self._scratch
        f = self.tr.ln_f
        args = native.Gpt2Step(B=B, D=D, H=self.H, hd=self.hd, F=Fw, V=V, T=T, L=self.L,
                               wte=p(self.tr.wte.weight), wpe=p(self.tr.wpe.weight), lnf_w=p(f.weight),
                               lnf_b=p(f.bias), eps_f=f.eps, head_w=p(self.lm_head.weight),
                               head_b=p(self.lm_head.bias), KV=p(self.KV), key_ok=p(self.key_ok), x=p(x), h=p(h),
                               o=p(o), g=p(g), scores=p(scores), sgemm=sgemm, split_cols=native.split_cols(),
                               layer=layers)
        for j, t in enumerate(scr):
            args.scr[j] = p(t)
        self._layers = layers
        return args

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._begin_step()
        if self.cstep is not None:
            return self._c_step(tokens)
        if self.rec is not None:
            self.rec.attn_ok = False  # the steps below do not record the attention
        if self.gelu == "tanh" and native_ok(self.weight_like):
            x = self._step_blocks(self.tr.wte(tokens) + self.tr.wpe(self.next_pos))
        else:
            x = self._forward(tokens[:, None], self.next_pos[:, None], self._attend_step, self._lin)[:, 0]
        self.t += 1
        self.next_pos = self.next_pos + 1
        return self._head(self._final_norm(x))

    def _c_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """step() in one call of ours (rlhfkit_gpt2_step, accel/csrc/kernels.c): embeddings, blocks, final
        norm and LM head, writing the KV cache and the record as _step_blocks does, with the same values to
        float rounding (tests/test_rollout.py). About 70 torch calls fewer per token."""
        rec, B = self.rec, tokens.size(0)
        s = -1 if rec is None else rec.s
        logits = None if rec is None else rec.out_logits()  # where _head writes them
        logits = self.KV.new_empty(B, self.vocab) if logits is None else logits
        tokens = tokens.to(torch.int64).contiguous()
        native.lib().rlhfkit_gpt2_step(ctypes.byref(self.cstep), native.ptr(tokens), native.ptr(self.next_pos),
                                       ctypes.c_int64(self.t), ctypes.c_int64(s), native.ptr(logits))
        self.t += 1
        self.next_pos = self.next_pos + 1
        return logits

    def _step_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """One decode step's blocks on x (B, D) (updated in place), with our kernels' epilogues: each linear
        layer multiplies without its bias (into the record where it keeps that layer), then one pass adds
        the bias and does what comes next: the KV-cache writes, the GELU, the residual add. The same values
        as _blocks to float rounding (tests/test_rollout.py), with fewer and cheaper small ops (about 0.2 ms
        of a 3.3 ms step on the trl-peer shapes: bench/kernels.py)."""
        B, D = x.shape
        rec = self.rec

        def mm(i: int, j: int, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            out = None if rec is None else rec.out(i, j)
            return torch.mm(h, weight) if out is None else torch.mm(h, weight, out=out)

        for i, blk in enumerate(self.tr.h):
            a, mlp = blk.attn, blk.mlp
            qkv = mm(i, 0, F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps), a.c_attn.weight)
            bias_kv_(qkv, a.c_attn.bias, D, self.KV[i, self.t, 0], self.KV[i, self.t, 1])
            o = self._attend_cached(i, qkv[:, :D].view(B, 1, self.H, self.hd).transpose(1, 2))
            bias_residual_(mm(i, 1, o.reshape(B, D), a.c_proj.weight), a.c_proj.bias, x)
            y = mm(i, 2, F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps), mlp.c_fc.weight)
            bias_residual_(mm(i, 3, bias_gelu_tanh_(y, mlp.c_fc.bias), mlp.c_proj.weight), mlp.c_proj.bias, x)
        return x


class LlamaDecoder(_Base):
    conv1d = False

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        super().__init__(cfg.num_hidden_layers, cfg.num_key_value_heads, hd)
        self.model, self.m, self.lm_head = model, model.model, model.lm_head
        self.weights_of = model
        self.H, self.D = cfg.num_attention_heads, cfg.hidden_size
        self.gqa = self.Hkv != self.H
        I = cfg.intermediate_size
        self.widths = [self.H * hd, self.Hkv * hd, self.Hkv * hd, self.D, I, I, self.D]
        self.fan_in = [self.D, self.D, self.D, self.H * hd, self.D, self.D, I]
        self.vocab, self.weight_like = self.lm_head.weight.size(0), self.m.embed_tokens.weight

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, attend, lin, keep: int = 0) -> torch.Tensor:
        """As GPT2Decoder._blocks; `keep` is accepted but every position is computed (callers slice)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        x = self.m.embed_tokens(ids)
        N, n, D = x.shape
        cos, sin = self.m.rotary_emb(x, pos)  # HF's own rotary (handles every rope scaling type)
        lean = getattr(lin, "lean", None)  # replay with gradients: layers whose every linear was recorded
        for i, layer in enumerate(self.m.layers):
            a, mlp = layer.self_attn, layer.mlp
            if lean is not None and lean(i):
                x = self._lean_block(i, layer, x, cos, sin, attend, lin.out)
                continue
            h = F.rms_norm(x, (D,), layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q = lin(i, 0, h, a.q_proj.weight, a.q_proj.bias).view(N, n, self.H, self.hd).transpose(1, 2)
            k = lin(i, 1, h, a.k_proj.weight, a.k_proj.bias).view(N, n, self.Hkv, self.hd).transpose(1, 2)
            v = lin(i, 2, h, a.v_proj.weight, a.v_proj.bias).view(N, n, self.Hkv, self.hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = attend(i, q, k, v).transpose(1, 2).reshape(N, n, self.H * self.hd)
            x = x + lin(i, 3, o, a.o_proj.weight, a.o_proj.bias)
            h = F.rms_norm(x, (D,), layer.post_attention_layernorm.weight,
                           layer.post_attention_layernorm.variance_epsilon)
            g = F.silu(lin(i, 4, h, mlp.gate_proj.weight, None)) * lin(i, 5, h, mlp.up_proj.weight, None)
            x = x + lin(i, 6, g, mlp.down_proj.weight, None)
        return x

    def _lean_block(self, i: int, layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, attend, out) -> torch.Tensor:
        """Layer i of a replay from a record of all seven of its linear layers' outputs (as GPT2Decoder's):
        the forward adds the recorded output projections to the residual stream, the backward recomputes
        the RMS norms, the rotary embedding and attention, and the SwiGLU (_PreSavedLinears)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

        N, n, D = x.shape
        a, mlp, ln1, ln2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm

        def norm(eps: float):
            return lambda x, w: F.rms_norm(x, (D,), w, eps)

        def rotate_keys(k: torch.Tensor) -> torch.Tensor:  # apply_rotary_pos_emb's, for keys alone
            return k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)

        q, k, v = _PreSavedLinears.apply(norm(ln1.variance_epsilon), 2, False, x, ln1.weight,
                                         a.q_proj.weight, a.q_proj.bias, out(i, 0),
                                         a.k_proj.weight, a.k_proj.bias, out(i, 1),
                                         a.v_proj.weight, a.v_proj.bias, out(i, 2))
        q = q.view(N, n, self.H, self.hd).transpose(1, 2)
        k = k.view(N, n, self.Hkv, self.hd).transpose(1, 2)
        v = v.view(N, n, self.Hkv, self.hd).transpose(1, 2)
        fn, inputs = attend.lean(i, q, k, v, rotate_keys)

        def attn(q: torch.Tensor, k: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            return fn(q, k, *rest).transpose(1, 2).reshape(N, n, self.H * self.hd)

        x = x + _PreSavedLinears.apply(attn, len(inputs), False, *inputs,
                                       a.o_proj.weight, a.o_proj.bias, out(i, 3))
        gate, up = _PreSavedLinears.apply(norm(ln2.variance_epsilon), 2, False, x, ln2.weight,
                                          mlp.gate_proj.weight, None, out(i, 4),
                                          mlp.up_proj.weight, None, out(i, 5))
        return x + _PreSavedLinears.apply(lambda g, u: F.silu(g) * u, 2, False, gate, up,
                                          mlp.down_proj.weight, None, out(i, 6))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        nrm = self.m.norm
        return F.rms_norm(x, (self.D,), nrm.weight, nrm.variance_epsilon)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor:
        U, P = ids.shape
        self._alloc(U * repeat, P + max_new, self.m.embed_tokens.weight)
        pmask = self._prompt_masks(mask, repeat, max_new)

        def attend(i, q, k, v):
            self._store_prompt_kv(i, k, v, repeat)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=pmask, is_causal=pmask is None,
                                                  enable_gqa=self.gqa)

        x = self._forward(ids, self.pos, attend, self._lin)[:, -1]
        logits = self._head(self._final_norm(x))
        return logits.repeat_interleave(repeat, 0) if repeat > 1 else logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._begin_step()
        packs = decode_packs(self, tokens.size(0))
        if packs is not None:
            logits = self._packed_step(tokens, packs)
        else:
            x = self._forward(tokens[:, None], self.next_pos[:, None], self._attend_step, self._lin)[:, 0]
            logits = self._head(self._final_norm(x))
        self.t += 1
        self.next_pos = self.next_pos + 1
        return logits

    def _packed_step(self, tokens: torch.Tensor, pk: _Packs) -> torch.Tensor:
        """step() with the weights packed for this step's rows (_Packs): one product for q|k|v and one for
        gate|up, the rotary embedding of queries and keys in one pass, the same values as _forward's step
        to float rounding (tests/test_rollout.py). The record gets each linear layer's output as _lin
        writes it."""
        from transformers.models.llama.modeling_llama import rotate_half

        rec, B, D, H, hd = self.rec, tokens.size(0), self.D, self.H, self.hd
        nq, nk, I = H * hd, self.Hkv * hd, self.widths[4]
        x = self.m.embed_tokens(tokens)  # (B, D), a new tensor: updated in place below
        cos, sin = self.m.rotary_emb(x[:, None], self.next_pos[:, None])  # (B, 1, hd)
        scratch = pk.scratch
        for i, layer in enumerate(self.m.layers):
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            y = pk.mm(i, 0, F.rms_norm(x, (D,), ln1.weight, ln1.variance_epsilon), scratch[0])  # q | k | v
            self._record_parts(i, (0, 1, 2), y, (nq, nk, nk))
            qk = y[:, :nq + nk].view(B, H + self.Hkv, hd)
            qk = qk * cos + rotate_half(qk) * sin                                # apply_rotary_pos_emb's
            self.KV[i, self.t, 0].copy_(qk[:, H:])
            self.KV[i, self.t, 1].copy_(y[:, nq + nk:].view(B, self.Hkv, hd))
            o = self._attend_cached(i, qk[:, :H, None]).reshape(B, nq)
            x += pk.mm(i, 1, o, self._out(i, 3, scratch[1]))
            gu = pk.mm(i, 2, F.rms_norm(x, (D,), ln2.weight, ln2.variance_epsilon), scratch[2])  # gate | up
            self._record_parts(i, (4, 5), gu, (I, I))
            x += pk.mm(i, 3, F.silu(gu[:, :I]) * gu[:, I:], self._out(i, 6, scratch[3]))
        logits = None if rec is None else rec.out_logits()
        return pk.head.mm(self._final_norm(x), x.new_empty(B, self.vocab) if logits is None else logits)

    def _out(self, i: int, j: int, scratch: torch.Tensor) -> torch.Tensor:
        """Where linear j of block i writes at this step: the record's place if it keeps it, else scratch."""
        out = None if self.rec is None else self.rec.out(i, j)
        return scratch if out is None else out

    def _record_parts(self, i: int, js: tuple[int, ...], y: torch.Tensor, widths: tuple[int, ...]) -> None:
        """The record's copies of the linear layers js of block i, whose outputs are y's column blocks."""
        if self.rec is not None:
            for j, part in zip(js, y.split(widths, 1)):
                out = self.rec.out(i, j)
                if out is not None:
                    out.copy_(part)


_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoded model -> _Packs


class _Packs:
    """A Llama model's decode-step weights packed for one number of rows (native.PackedWeight): per layer
    q|k|v, o, gate|up and down (with their biases, added after the product), and the LM head."""

    def __init__(self, dec: LlamaDecoder, rows: int, stamp: tuple) -> None:
        self.rows, self.stamp = rows, stamp
        self.layers = [[native.PackedWeight(w, rows) for w in self._weights(layer)] for layer in dec.m.layers]
        self.bias = [self._biases(layer) for layer in dec.m.layers]
        self.head = native.PackedWeight(dec.lm_head.weight, rows)
        self.scratch = [dec.weight_like.new_empty(rows, pw.n) for pw in self.layers[0]]  # each product's output

    @staticmethod
    def _weights(layer: torch.nn.Module) -> list[torch.Tensor]:
        a, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            return [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight]

    @staticmethod
    def _biases(layer: torch.nn.Module) -> list[torch.Tensor | None]:
        a = layer.self_attn
        with torch.no_grad():
            qkv = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        return [qkv, a.o_proj.bias, None, None]

    def repack(self, dec: LlamaDecoder, stamp: tuple) -> None:
        for packs, layer in zip(self.layers, dec.m.layers):
            for pw, w in zip(packs, self._weights(layer)):
                pw.repack(w)
        self.bias = [self._biases(layer) for layer in dec.m.layers]
        self.head.repack(dec.lm_head.weight)
        self.stamp = stamp

    def mm(self, i: int, j: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        y = self.layers[i][j].mm(x.contiguous(), out)
        b = self.bias[i][j]
        return y if b is None else y.add_(b)


def decode_packs(dec: LlamaDecoder, rows: int) -> _Packs | None:
    """The packed weights of `dec`'s model for decode steps of `rows` rows, packed again when the weights
    changed (utils/weights.py's stamp of `dec.weights_of`); None where packing does not apply: not CPU
    float32 with our kernels and MKL's packed sgemm, or weights over an eighth of the machine's memory
    (the packed copy costs as much again)."""
    model = dec.model
    if not native.packed_ok(dec.weight_like):
        return None
    kept = _PACKS.get(model)
    now = weights.stamp(dec.weights_of)
    if kept is not None and kept.rows == rows:
        if kept.stamp != now:
            kept.repack(dec, now)
        return kept
    params = list(model.parameters())
    if not native.packed_ok(*params) or any(p.is_meta for p in params):
        return None
    size = sum(p.numel() * p.element_size() for p in params)
    if size > _memory_bytes() / 8:
        return None
    _PACKS.pop(model, None)  # another number of rows: the old packs go first
    _PACKS[model] = _Packs(dec, rows, now)
    return _PACKS[model]


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def backbone_supported(backbone: torch.nn.Module) -> bool:
    """True if `backbone` (a critic's or reward model's, under a scalar head) is a plain GPT-2 body that
    `backbone_hidden` runs: no dropout now, no gradient checkpointing, no adapters."""
    return (type(backbone).__name__ == "GPT2Model" and _gpt2_ok(backbone.config) and dropout_free(backbone)
            and not getattr(backbone, "gradient_checkpointing", False))


def backbone_hidden(backbone: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The final-normed hidden states (N, keep, D) of the last `keep` positions of ids (N, T), left-padded
    by mask, through a GPT-2 body (backbone_supported), with gradients: what backbone(ids, mask,
    position_ids).last_hidden_state[:, -keep:] gives, to float rounding, without the last block's work at
    the earlier positions (_blocks' keep). The critic's pass (rollout.completion_values), where only the
    completion positions have values that are used."""
    dec = GPT2Decoder(backbone)
    pmask = dec._prompt_masks(mask, 1, 0)  # positions count real tokens; pad keys masked (the decoders' rules)

    def attend(i, q, k, v):
        return _causal_attention(q, k, v, pmask, False)

    if _fused_attention_ok(dec.weight_like, dec.hd):
        attend.qkv = lambda i, qkv, m: fused_attention(qkv, dec.H, m, dec.key_ok)

    def lin(i, j, x, weight, bias):
        return _linear(x, weight, bias, True)

    if dec.gelu == "tanh":  # the MLP's up-projection, bias and GELU on our kernels (_LinearGeluTanh)
        lin.gelu = _linear_gelu_grad

    return dec._final_norm(dec._forward(ids, dec.pos, attend, lin, keep=keep))


def make_fast_decoder(model: torch.nn.Module):
    return GPT2Decoder(model) if type(model).__name__ == "GPT2LMHeadModel" else LlamaDecoder(model)


def dropout_free(model: torch.nn.Module) -> bool:
    """True if `model`'s forward applies no dropout now (eval mode, or every dropout rate 0): our
    decoders have none."""
    cfg = model.config
    drops = [getattr(cfg, k, 0.0) or 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")]
    return not (model.training and any(d > 0 for d in drops))


def can_record(model: torch.nn.Module) -> bool:
    """True if the training forward of `model` can be replayed from a rollout's record: one of our
    decoders reads it, it trains without dropout (the decoder has none), whole (no adapters) and without
    gradient checkpointing (whose point is not keeping activations)."""
    if not supported(model) or not any(p.requires_grad for p in model.parameters()):
        return False
    if not dropout_free(model):
        return False
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class _NoRecord:
    """What replay reads of a record, with nothing recorded: replay is then a plain forward."""
    first = logits = None

    attn_ok = False

    def __init__(self, n_layer: int, n_linear: int) -> None:
        self.prompt = self.comp = [[None] * n_linear for _ in range(n_layer)]


def forward_logits(model: torch.nn.Module, ro) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, 1, V) and (B, C - 1, V) of rollout `ro`'s completion tokens by our own forward (replay
    with nothing recorded): each group's prompt runs once and the completions run time-major, with no HF
    call overhead; the prompts' half comes from the model's PromptCache where it has one (cache_prompts).
    For supported(model) models without dropout (dropout_free)."""
    dec = make_fast_decoder(model)
    return dec.replay(ro, _NoRecord(dec.L, len(dec.widths)), _CACHES.get(model))


class PromptCache:
    """The prompt half of a frozen model's forward, per prompt: every layer's keys and values at the
    prompt's real tokens and the final-normed hidden state of its last token. A reference model sees the
    same prompts again whenever the prompt set is smaller than the steps times the prompts per step
    (every epoch after the first; on `rlhfkit bench trl-peer`'s PPO, whose 64 prompts are all drawn at
    every step, from the second step on), and those prompts' positions, about a third of its forward
    there, need not run again.

    Exact up to float rounding: with left padding a prompt's real tokens are computed independently of
    its padding (positions count real tokens, pad keys are masked), so an entry serves any batch; the
    products may round differently in a batch of another size (tests/test_rollout.py). Entries are
    dropped, least recently used first, beyond `max_mb`, and all of them if the model's weights change
    (utils/weights.py's stamp, as Record.usable)."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes, self.hits, self.misses, self.stamp = 0, 0, 0, None
        self._seen = (0, 0)  # hits and misses at the last hit_frac()

    def hit_frac(self) -> float:
        """The fraction of prompts looked up since the last call that were in the cache (0 if none were)."""
        hits, misses = self.hits - self._seen[0], self.misses - self._seen[1]
        self._seen = (self.hits, self.misses)
        return hits / (hits + misses) if hits + misses else 0.0

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def lookup(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, compute
               ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Keys and values per layer ((N, Hkv, P, hd) each, zeros at pad slots) and the hidden states
        (N, 1, D) of prompts `ids` (N, P) left-padded by `mask`; compute(rows) runs the prompt pass
        (replay's prompt_pass: its kv list and hidden states) for the rows it lacks."""
        stamp = weights.stamp(model)
        if stamp != self.stamp:
            self.clear()
            self.stamp = stamp
        N, P = ids.shape
        lengths = mask.long().sum(-1).tolist()
        keys = [tuple(ids[r, P - n:].tolist()) for r, n in enumerate(lengths)]
        got = [self.entries.get(k) for k in keys]
        missing = [r for r, e in enumerate(got) if e is None]
        self.hits += N - len(missing)
        self.misses += len(missing)
        if missing:
            kv, h = compute(torch.tensor(missing, device=ids.device))
            for j, r in enumerate(missing):
                n = lengths[r]
                kvr = torch.stack([torch.stack((k[j, :, P - n:], v[j, :, P - n:])) for k, v in kv])
                got[r] = (kvr, h[j].clone())  # (L, 2, Hkv, n, hd), (1, D)
                self._put(keys[r], got[r])
        for k in keys:
            if k in self.entries:
                self.entries.move_to_end(k)
        kvs, hs = zip(*got)
        h = torch.stack(hs)
        if all(n == P for n in lengths):
            full = torch.stack(kvs, 2)  # (L, 2, N, Hkv, P, hd)
        else:
            full = kvs[0].new_zeros(kvs[0].shape[:2] + (N,) + kvs[0].shape[2:3] + (P,) + kvs[0].shape[4:])
            for r, (e, n) in enumerate(zip(kvs, lengths)):
                full[:, :, r, :, P - n:] = e
        return [(full[i, 0], full[i, 1]) for i in range(full.size(0))], h

    def _put(self, key: tuple[int, ...], entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if size > self.max_bytes:
            return
        self.entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_cache(model: torch.nn.Module) -> PromptCache | None:
    """The PromptCache that cache_prompts gave `model`, if any."""
    return _CACHES.get(model)


def cache_prompts(model: torch.nn.Module, max_mb: float) -> PromptCache | None:
    """Give a frozen model's plain forwards (forward_logits: a reference's log-probs) a PromptCache of
    up to max_mb; None (and no cache) where max_mb is 0 or our forward does not run the model."""
    if max_mb <= 0 or not supported(model):
        _CACHES.pop(model, None)
        return None
    cache = _CACHES[model] = PromptCache(max_mb)
    return cache
