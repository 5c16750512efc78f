"""Our attention kernels for training passes (accel/fastdecode.py's _Attention, accel/csrc/kernels.c's
rlhfkit_attention_forward / _backward) against torch's attention in float64: outputs and the gradients of
qkv and of a shared prefix's keys and values, for causal self-attention, queries at the last positions
only, prompt prefixes shared by groups of rows, padding masks (a pad query sees itself) and the
time-major layout of the completions' replay."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.accel import native
from rlhfkit.accel.fastdecode import _fused_attention_ok, fused_attention

pytestmark = pytest.mark.skipif(not _fused_attention_ok(torch.zeros(1), 16),
                                reason=f"our kernels are off: {native.native_status()}")


def reference(qkv, prefix, key_ok, H, m, G, time_major):
    """torch's attention in float64 on the keys [prefix repeated G times ; own], with the rules of
    _prompt_masks: causal over the own keys, pad keys masked, each query sees its own key."""
    qkv = qkv.double()
    if time_major:
        qkv = qkv.transpose(0, 1)
    B, n, width = qkv.shape
    hd = width // (3 * H)
    q, k, v = qkv.view(B, n, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q = q[:, :, n - m:]
    n1 = 0
    if prefix is not None:
        k1, v1 = (t.double().repeat_interleave(G, 0) for t in prefix)
        n1 = k1.size(2)
        k, v = torch.cat([k1, k], 2), torch.cat([v1, v], 2)
    i = torch.arange(m)[:, None] + (n - m)  # the queries' own positions
    j = torch.arange(n1 + n)[None] - n1     # the keys' own positions (prefix keys < 0)
    visible = (j <= i)[None] & (key_ok[:, None, :] if key_ok is not None else True)
    visible = visible | (j == i)[None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
    o = o.transpose(1, 2).reshape(B, m, H * hd)
    return o.transpose(0, 1) if time_major else o


CASES = [  # B, H, n, m, hd, n1, G, masked, time_major
    (4, 2, 7, 7, 16, 0, 1, False, False),     # fewer keys than a vector
    (4, 2, 23, 23, 64, 0, 1, True, False),
    (3, 2, 20, 5, 32, 0, 1, True, False),     # the last 5 positions only (the critic's last block)
    (5, 3, 21, 1, 16, 0, 1, True, False),     # one query (the prompt pass's last block)
    (8, 4, 31, 31, 64, 16, 4, False, True),   # completions after a prompt shared by groups of 4
    (6, 2, 9, 9, 64, 17, 2, True, True),      # padded prompts, groups of 2
    (2, 1, 40, 40, 16, 3, 1, True, False),
]


@pytest.mark.parametrize("B,H,n,m,hd,n1,G,masked,time_major", CASES)
def test_attention_matches_torch(B, H, n, m, hd, n1, G, masked, time_major):
    g = torch.Generator().manual_seed(B * 100 + n)
    D = H * hd
    shape = (n, B, 3 * D) if time_major else (B, n, 3 * D)
    qkv = torch.randn(shape, generator=g).requires_grad_()
    prefix = None
    if n1:
        pre = torch.randn(B // G, n1, 2, H, hd, generator=g).requires_grad_()  # views with the model's strides
        prefix = tuple(pre.permute(2, 0, 3, 1, 4).unbind(0))
    key_ok = None
    if masked:
        key_ok = torch.rand(B, n1 + n, generator=g) > 0.3
        if n1:  # a prompt's rows share its mask
            key_ok[:, :n1] = key_ok[::G, :n1].repeat_interleave(G, 0)
        key_ok[0, n1 + n - m] = False  # a pad query: it sees itself only among its own keys

    out = fused_attention(qkv, H, m, key_ok, prefix, G, time_major)
    want = reference(qkv, prefix, key_ok, H, m, G, time_major)
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)

    grad = torch.randn(out.shape, generator=g)
    wrt = [qkv] + ([pre] if n1 else [])
    got = torch.autograd.grad(out, wrt, grad)
    expected = torch.autograd.grad(want, wrt, grad.double())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-6, rtol=0)
    if m < n:  # no query at the first positions: their query gradient is exactly 0
        dq = got[0].view(*shape[:2], 3, D)[..., 0, :]
        assert not (dq.transpose(0, 1) if time_major else dq)[:, :n - m].any()


def test_attention_output_layout_feeds_the_projection():
    """The output is a plain (rows, m, D) tensor (time-major (m, rows, D)) in the projection's layout, and
    the gradient of qkv has qkv's shape and strides."""
    qkv = torch.randn(31, 8, 3 * 128, requires_grad=True)
    out = fused_attention(qkv, 2, 31, None, None, 1, time_major=True)
    assert out.shape == (31, 8, 128) and out.is_contiguous()
    (dqkv,) = torch.autograd.grad(out.sum(), [qkv])
    assert dqkv.shape == qkv.shape and dqkv.stride() == qkv.stride()
