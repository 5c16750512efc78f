"""Our caching CPU allocator (accel/cpu_alloc.py): large tensors come from a pool of mappings and are
reused by size class, the pool stays under its cap, small tensors and foreign blocks go to torch, it
survives fork, it can be turned off, it falls back with a reason, and training through it gives the
updates torch's allocator gives."""
from __future__ import annotations

import os

import pytest
import torch

from rlhfkit.accel import cpu_alloc
from rlhfkit.errors import ConfigError

MB = 1 << 20


@pytest.fixture
def alloc():
    if not cpu_alloc.install():
        pytest.skip(f"our CPU allocator is {cpu_alloc.status()}")
    cpu_alloc.trim(0)
    yield cpu_alloc
    cpu_alloc.install()  # the defaults again, whatever a test set


def test_size_classes_by_hand(alloc):
    """4 KiB pages, then 8 classes per power of two: 1 MiB + 1 byte -> 1.125 MiB; 300,000 B -> 73.24 pages
    -> 74 pages = 303,104 B, above 2^18 so in steps of 2^18 / 8 = 32 KiB -> 327,680 B."""
    before = alloc.stats()
    x = torch.empty(MB + 1, dtype=torch.uint8)
    assert alloc.stats()["live"] - before["live"] == MB + MB // 8
    y = torch.empty(300_000, dtype=torch.uint8)
    assert alloc.stats()["live"] - before["live"] == MB + MB // 8 + 327_680
    del x, y
    assert alloc.stats()["live"] == before["live"]


def test_big_tensors_are_pooled_and_reused(alloc):
    s0 = alloc.stats()
    x = torch.full((MB // 4,), 1.5)  # 1 MiB of float32
    s1 = alloc.stats()
    assert s1["live"] == s0["live"] + MB and s1["misses"] == s0["misses"] + 1
    ptr = x.data_ptr()
    assert ptr % 4096 == 0  # its own mapping
    del x
    s2 = alloc.stats()
    assert s2["live"] == s0["live"] and s2["pooled"] == s0["pooled"] + MB
    y = torch.zeros(MB // 4 - 1000)  # a little smaller: same block (within the slack), and really zeroed
    s3 = alloc.stats()
    assert y.data_ptr() == ptr and s3["hits"] == s2["hits"] + 1 and s3["misses"] == s2["misses"]
    assert y.sum().item() == 0.0
    z = torch.empty(MB // 16)  # 256 KiB: too small for the 1 MiB block (over 50% larger), a new mapping
    assert z.data_ptr() != ptr and alloc.stats()["misses"] == s3["misses"] + 1
    w = torch.empty(1000)  # 4 KB: torch's default allocator
    assert alloc.stats()["live"] == s3["live"] + MB // 4
    del y, z, w


def test_most_recently_freed_block_is_reused_first(alloc):
    a, b = torch.empty(MB // 4), torch.empty(MB // 4)
    pa, pb = a.data_ptr(), b.data_ptr()
    del a
    del b  # freed last
    c = torch.empty(MB // 4)
    d = torch.empty(MB // 4)
    assert (c.data_ptr(), d.data_ptr()) == (pb, pa)


def test_the_pool_stays_under_its_cap(alloc):
    alloc.install(cap=3 * MB)
    s0 = alloc.stats()
    xs = [torch.empty((k + 4) * MB // 16) for k in range(12)]  # 12 sizes from 1 MiB to 3.75 MiB
    live = alloc.stats()["live"] - s0["live"]
    del xs
    s = alloc.stats()
    assert s["live"] == s0["live"] and 0 < s["pooled"] <= 3 * MB < live
    assert s["mapped"] == s["live"] + s["pooled"]  # everything else went back to the kernel
    alloc.trim(0)
    assert alloc.stats()["pooled"] == 0 and alloc.stats()["mapped"] == alloc.stats()["live"]


def test_values_survive_reuse_and_ops_agree_with_torch_math(alloc):
    """A pooled block holds whatever it held: every op writes all of its output, so results do not
    depend on it. Matmuls, reductions and in-place ops on pool blocks match float64 math."""
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a, b = torch.randn(256, 512, generator=g), torch.randn(512, 384, generator=g)
        c = a @ b
        ref = (a.double() @ b.double()).float()
        assert torch.allclose(c, ref, atol=1e-4)
        d = torch.empty_like(c).copy_(c).mul_(2).add_(1)
        assert torch.equal(d, c * 2 + 1)
        del a, b, c, d


def test_a_forked_child_allocates_and_frees(alloc):
    x = torch.ones(MB)
    pid = os.fork()
    if pid == 0:  # the child: the pool and its lock were copied; both must work
        code = 2  # if anything raises
        try:
            y = torch.ones(MB) * 2
            code = 0 if (y.sum().item() == 2 * MB) and (x.sum().item() == MB) else 1
            del y
        finally:
            os._exit(code)  # never back into pytest
    _, code = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(code) == 0
    del x


def test_system_turns_it_off_and_auto_turns_it_on(alloc):
    x = torch.empty(MB)
    assert alloc.use("system", torch.device("cpu")).startswith("off")
    s = alloc.stats()
    assert not s["enabled"] and s["pooled"] == 0
    y = torch.empty(MB)  # torch's now
    assert alloc.stats()["live"] == s["live"]
    del x  # ours, freed while off: unmapped at once
    assert alloc.stats()["mapped"] == s["mapped"] - 4 * MB
    assert alloc.use("auto", torch.device("cpu")).startswith("on")
    del y  # torch's block, freed while ours is on: handed back to torch
    assert alloc.stats()["enabled"]
    with pytest.raises(ConfigError, match="run.cpu_allocator='fast'"):
        alloc.use("fast", torch.device("cpu"))


def test_falls_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_alloc, "_state", {})
    monkeypatch.setenv("RLHFKIT_NATIVE", "0")
    assert cpu_alloc.status() == "off (RLHFKIT_NATIVE=0)"
    monkeypatch.setattr(cpu_alloc, "_state", {})
    monkeypatch.delenv("RLHFKIT_NATIVE")
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert not cpu_alloc.install()
    assert cpu_alloc.status() == "off (no C++ compiler: 'no-such-compiler-here' not found; set CXX)"
    assert cpu_alloc.use("auto", torch.device("cpu")).startswith("off (no C++ compiler")
    with pytest.raises(ConfigError, match="run.cpu_allocator=caching, but our CPU allocator is off"):
        cpu_alloc.use("caching", torch.device("cpu"))


def test_grpo_updates_are_the_same_through_our_allocator(tmp_path, tiny_tokenizer, tiny_model_cfg, monkeypatch,
                                                         capsys):
    """Two GRPO steps on the tiny policy with torch's allocator, then with ours serving every tensor of
    4 KiB or more: the same rewards, losses and weights, bit for bit."""
    if not cpu_alloc.install():
        pytest.skip(f"our CPU allocator is {cpu_alloc.status()}")
    from safetensors.torch import load_file

    from rlhfkit.config import GRPOConfig
    from rlhfkit.rl.grpo import train
    from rlhfkit.utils.logging import read_jsonl
    from tests.rl_utils import make_policy_dir, rl_cfg, write_prompts

    policy, prompts = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg), write_prompts(tmp_path)
    monkeypatch.setattr(cpu_alloc, "THRESHOLD", 4096)
    runs = {}
    for mode in ("system", "caching"):
        before = cpu_alloc.stats()
        run = tmp_path / mode
        train(rl_cfg(GRPOConfig, policy, prompts, run, **{"optim.max_steps": 2, "kl.coef": 0.05,
                                                           "optim.batch_size": 8, "run.cpu_allocator": mode}))
        used = cpu_alloc.stats()["hits"] - before["hits"]
        header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("grpo:"))
        assert header.endswith("CPU allocator: ours (caching)" if mode == "caching" else "CPU allocator: torch's")
        assert (used > 1000) if mode == "caching" else (used == 0), (mode, used)
        runs[mode] = (read_jsonl(run / "metrics.jsonl"), load_file(str(run / "final" / "model.safetensors")))
    cpu_alloc.install()
    (m0, w0), (m1, w1) = runs["system"], runs["caching"]
    for a, b in zip(m0, m1):
        for k in ("rollout/reward_mean", "loss/policy", "grad_norm", "kl/mean"):
            assert a[k] == b[k], k
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
