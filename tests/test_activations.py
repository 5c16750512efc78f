"""Our CPU kernels (accel/native.py, accel/activations.py): the tanh-GELU and its derivative against
float64, on contiguous and strided inputs; the decode-step epilogues against torch's ops; the autograd
wiring, the fallback to torch's, and where the models use them."""
import math
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.accel import activations as act
from rlhfkit.accel import native

C = math.sqrt(2 / math.pi)
# Tests of our kernels themselves; with RLHFKIT_NATIVE=0 the fallback (torch's ops) is what runs, and
# test_switched_off_it_is_torchs / test_a_failed_build_falls_back_with_the_reason test that instead.
needs_kernels = pytest.mark.skipif(os.environ.get("RLHFKIT_NATIVE") == "0",
                                   reason="RLHFKIT_NATIVE=0: our kernels are off")


def gelu64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu(x) and gelu'(x) in float64 from the tanh formula (the hand-derived derivative)."""
    x = x.double()
    t = torch.tanh(C * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * C * (1 + 3 * 0.044715 * x * x)


def scaled_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(|ref|, 1): relative for large values, absolute near 0."""
    return float(((a.double() - ref).abs() / ref.abs().clamp(min=1)).max())


def inputs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.cat([torch.randn(n, generator=g) * 3, torch.linspace(-12, 12, 1001),
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e4, -1e4])])


def test_the_kernel_is_built_where_a_compiler_is():
    """On Linux with a C compiler and torch's libgomp (this machine and CI), the kernel must be in use:
    a silent fallback would hide a broken build."""
    if not sys.platform.startswith("linux") or shutil.which("cc") is None:
        pytest.skip("no C compiler here: the fallback is tested below")
    if os.environ.get("RLHFKIT_NATIVE") == "0":
        pytest.skip("RLHFKIT_NATIVE=0: our kernels are off on purpose (the fallback is tested below)")
    assert act.native_status().startswith("on"), act.native_status()


@needs_kernels
@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 70001])  # below, at and across the kernel's blocks
def test_forward_and_backward_match_float64(n):
    x = inputs(n)
    f, d = gelu64(x)
    y = act.gelu_tanh_forward(x)
    dy = torch.linspace(-2, 2, x.numel())
    dx = act.gelu_tanh_backward(dy, x)
    assert y.dtype == dx.dtype == torch.float32 and y.shape == dx.shape == x.shape
    assert scaled_err(y, f) < 3e-7
    assert scaled_err(dx, dy.double() * d) < 5e-7
    # the same function as torch's, to float rounding (torch's own backward is off by up to 2e-6: it
    # gives 0 at x = -5.06, where dy gelu'(x) = 2.0e-6)
    assert scaled_err(y, F.gelu(x, approximate="tanh").double()) < 5e-7
    assert scaled_err(dx, torch.ops.aten.gelu_backward(dy, x, approximate="tanh").double()) < 4e-6


@needs_kernels
@pytest.mark.parametrize("n", [1, 4097, 70001])
def test_activation_and_backward_in_one_pass_match_float64(n):
    """gelu_tanh_and_backward_ (replay's MLP backward): gelu(x) returned and dg * gelu'(x) in place, both
    against float64, the cut-offs far out the same as the separate kernels', and a strided x read in place."""
    x = inputs(n)
    f, d = gelu64(x)
    dg = torch.linspace(-2, 2, x.numel())
    before = dg.clone()
    expect = dg.double() * d
    g = act.gelu_tanh_and_backward_(x, dg)
    assert scaled_err(g, f) < 3e-7 and scaled_err(dg, expect) < 5e-7
    assert g[-1] == 0 and g[-2] == 1e4 and dg[-1] == 0 and dg[-2] == before[-2]  # x = -1e4, 1e4
    view = torch.randn(64, 300)[:, :100]  # rows of 100 at a stride of 300
    dg2 = torch.randn(64, 100)
    want = act.gelu_tanh_backward(dg2, view.contiguous())
    g2 = act.gelu_tanh_and_backward_(view, dg2)
    torch.testing.assert_close(g2, act.gelu_tanh_forward(view.contiguous()), rtol=5e-7, atol=1e-7)
    torch.testing.assert_close(dg2, want, rtol=5e-7, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 1504])
def test_backward_with_the_bias_gradient_in_one_pass(rows):
    """gelu_tanh_backward_colsum (the critic's MLP): dy * gelu'(x) as the plain kernel gives it, and its sum
    over the rows (the bias's gradient) against float64."""
    g = torch.Generator().manual_seed(rows)
    x, dy = torch.randn(rows, 1024, generator=g) * 3, torch.randn(rows, 1024, generator=g)
    dx, colsum = native.gelu_tanh_backward_colsum(dy, x)
    torch.testing.assert_close(dx, act.gelu_tanh_backward(dy, x), rtol=0, atol=0)
    torch.testing.assert_close(colsum.double(), dx.double().sum(0), rtol=0, atol=2e-5 * rows ** 0.5)


@needs_kernels
def test_strided_inputs_are_read_in_place_with_the_same_values():
    """A micro-batch's rows of a time-major (T, B, F) record, as (N, n, F) views: the strided kernels
    give exactly the contiguous kernel's values, in a contiguous result (and into `out`)."""
    torch.manual_seed(0)
    rec = torch.randn(7, 12, 300) * 4
    views = [rec[:, 4:9].transpose(0, 1),               # (5, 7, 300), strides (300, 3600, 1)
             rec[:, torch.tensor([1, 3])].transpose(0, 1),  # gathered rows (a copy already)
             rec[2, :, 10:250],                           # 2-D, rows of 240 at stride 300
             rec[3, 5]]                                   # 1-D
    for x in views:
        dy = torch.randn(x.shape)
        y, dx = act.gelu_tanh_forward(x), act.gelu_tanh_backward(dy, x)
        assert y.is_contiguous() and dx.is_contiguous() and y.shape == dx.shape == x.shape
        assert torch.equal(y, act.gelu_tanh_forward(x.contiguous()))
        assert torch.equal(dx, act.gelu_tanh_backward(dy, x.contiguous()))
        out = dy.clone()
        assert act.gelu_tanh_backward(out, x, out=out) is out and torch.equal(out, dx)
    x = rec[:, :, ::2]  # no contiguous rows: copied first, same values
    assert native.rows_of(x) is None
    assert torch.equal(act.gelu_tanh_forward(x), act.gelu_tanh_forward(x.contiguous()))


@pytest.mark.parametrize("on", [True, False])
def test_decode_epilogues_match_torch(on, monkeypatch):
    """bias_gelu_tanh_, bias_kv_ and bias_residual_ (ours, and torch's where ours are off) against the
    ops they replace: addmm's bias, the GELU, the KV-cache copies, the residual add."""
    if not on:
        monkeypatch.setattr(native, "_state", {})
        monkeypatch.setenv("RLHFKIT_NATIVE", "0")
    torch.manual_seed(1)
    x, w, b = torch.randn(64, 32), torch.randn(32, 96), torch.randn(96)
    full = torch.addmm(b, x, w)

    y = x @ w
    g = native.bias_gelu_tanh_(y, b)
    torch.testing.assert_close(y, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(g, F.gelu(full, approximate="tanh"), rtol=0, atol=2e-5)

    y = x @ w
    cache = torch.zeros(2, 64, 4, 8)  # keys, values: (rows, heads, head_dim) blocks, as the KV cache's
    native.bias_kv_(y, b, 32, cache[0], cache[1])
    torch.testing.assert_close(y, full, rtol=0, atol=1e-5)
    assert torch.equal(cache[0].view(64, 32), y[:, 32:64]) and torch.equal(cache[1].view(64, 32), y[:, 64:])

    y, res = x @ w, torch.randn(64, 96)
    expect = res + full
    native.bias_residual_(y, b, res)
    torch.testing.assert_close(y, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(res, expect, rtol=0, atol=2e-5)


def test_hand_values():
    # gelu(0) = 0, gelu'(0) = 1/2; far out it is x (x > 0) or 0 (x < 0), with slope 1 or 0
    x = torch.tensor([0.0, 1.0, 30.0, -30.0])
    y = act.gelu_tanh_forward(x)
    dx = act.gelu_tanh_backward(torch.ones(4), x)
    u = C * (1 + 0.044715)
    assert y.tolist() == pytest.approx([0.0, 0.5 * (1 + math.tanh(u)), 30.0, 0.0], abs=1e-7)
    assert dx.tolist() == pytest.approx([0.5, float(gelu64(torch.tensor([1.0]))[1]), 1.0, 0.0], abs=1e-6)


def test_nan_and_inf_propagate():
    x = torch.tensor([float("nan"), float("inf"), 1.0])
    y = act.gelu_tanh_forward(x)
    assert math.isnan(y[0]) and y[1] == float("inf") and y[2] == pytest.approx(0.841192, abs=1e-6)
    assert math.isnan(act.gelu_tanh_backward(torch.ones(3), x)[0])


@needs_kernels
def test_backward_in_place_and_strided_inputs():
    x = torch.randn(64, 300)[:, ::3]  # not contiguous
    dy = torch.randn(64, 100)
    expect = act.gelu_tanh_backward(dy, x.contiguous())
    out = dy.clone()
    got = act.gelu_tanh_backward(out, x, out=out)  # in place, as replay's backward does it
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(act.gelu_tanh_forward(x), act.gelu_tanh_forward(x.contiguous()), rtol=0, atol=0)


@needs_kernels
def test_autograd_gradients_equal_torchs():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 33, 64, generator=g) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w = torch.randn(8, 33, 64, generator=g)
    (act.gelu(x, "tanh") * w).sum().backward()
    (F.gelu(x_ref, approximate="tanh") * w).sum().backward()
    assert scaled_err(x.grad, w.double() * gelu64(x.detach())[1]) < 2e-6
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    # gradients of gradients are not ours: gelu() says so rather than returning wrong ones
    y = act.gelu(x, "tanh").sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_other_dtypes_and_the_exact_gelu_are_torchs():
    x = torch.randn(100, dtype=torch.float64)
    assert torch.equal(act.gelu(x, "tanh"), F.gelu(x, approximate="tanh"))
    xf = torch.randn(100)
    assert torch.equal(act.gelu(xf, "none"), F.gelu(xf))
    xb = xf.bfloat16()
    assert torch.equal(act.gelu_tanh_forward(xb), F.gelu(xb, approximate="tanh"))


def test_switched_off_it_is_torchs(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("RLHFKIT_NATIVE", "0")
    assert act.native_status() == "off (RLHFKIT_NATIVE=0)"
    x = torch.randn(5000)
    assert torch.equal(act.gelu(x, "tanh"), F.gelu(x, approximate="tanh"))
    dy = torch.randn(5000)
    assert torch.equal(act.gelu_tanh_backward(dy, x), torch.ops.aten.gelu_backward(dy, x, approximate="tanh"))


def test_a_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("RLHFKIT_NATIVE", raising=False)
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    if not sys.platform.startswith("linux"):
        pytest.skip("built on Linux only")
    assert act.native_status() == "off (no C compiler: 'no-such-compiler-here' not found; set CC)"
    x = torch.randn(100)
    assert torch.equal(act.gelu(x, "tanh"), F.gelu(x, approximate="tanh"))


def test_gpt2_models_get_our_module_and_the_same_outputs():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhfkit.accel.activations import use_fast_activations

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function="gelu_new",
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    ref = GPT2LMHeadModel(cfg)
    model = GPT2LMHeadModel(cfg)
    model.load_state_dict(ref.state_dict())
    use_fast_activations(model)
    assert sum(isinstance(m, act.GELUTanh) for m in model.modules()) == 2
    ids = torch.randint(0, 64, (3, 20))
    out, out_ref = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, out_ref, rtol=0, atol=2e-5)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
