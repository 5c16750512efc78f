"""The accelerated path computes what the plain path computes (rlhfkit/accel): every trainer, on a tiny
GPT-2 and a tiny Llama, 3 steps with the production optimizer (fused AdamW, gradient clipping), run once
with run.accel=auto (our kernels, our decoders, replay, the reference's prompt cache, our allocator) and
once with run.accel=off (PyTorch/transformers only), from the same seed and sampling randomness.

What must agree, and why these tolerances:
  * step 1 starts from identical weights. Its losses, KL, approx_kl, values and gradient norm agree to
    rtol 1e-4 (atol 1e-6): fp32 dot products summed in another order (our kernels vs BLAS, AVX2 vs
    AVX-512, one thread or more) differ by about sqrt(K) * 6e-8 relative for lengths K <= 512, ~1e-6,
    and a loss that is a sum of cancelling terms (advantages of mean 0) may lose one or two digits more;
  * from step 2 on the weights differ by what Adam made of that rounding. Adam's step is scale-free:
    an entry whose gradient is mostly cancellation noise moves by up to lr either way (we measured
    single entries 5e-5 apart after one step at lr 3e-3), so later metrics get rtol 1e-2;
  * the samples are compared token by token. Both paths invert the CDF with the same uniform numbers, so
    they sample the same tokens unless a logit difference moves a CDF boundary across a uniform number:
    negligible at step 1 (~1e-6), not at later steps (the weights differ as above). From the first step
    whose samples differ on, the two runs are different experiments and are not compared; that step
    must not be the first;
  * clipfrac to one token per step (a ratio within rounding of 1 +- clip lands on either side);
  * the policy's final weights, when every step sampled the same tokens: their difference is at most
    1e-3 of the update the run made (||W_auto - W_off|| <= 1e-3 * ||W_off - W_0||; measured 1e-5 to
    6e-5).
A fast path that reused stale work (a replay record or a cache kept across an optimizer step) fails at
step 1 by orders of magnitude: PPO's approx_kl and clipfrac drop to 0 with several updates per rollout.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlhfkit.config import DPOConfig, GRPOConfig, PPOConfig, REINFORCEConfig, RLOOConfig, check_config
from rlhfkit.utils.logging import read_jsonl
from tests.rl_utils import make_policy_dir, rl_cfg, write_prompts

STEPS = 3
pytestmark = pytest.mark.skipif(os.environ.get("RLHFKIT_ACCEL", "").lower() == "off",
                                reason="RLHFKIT_ACCEL=off runs both sides on the plain path")
KEYS = ("rollout/reward_mean", "rollout/length_mean", "kl/mean", "loss/policy", "loss/value", "ppo/approx_kl",
        "value/mean", "policy/entropy", "grad_norm")

CASES = {
    "ppo": (PPOConfig, {"rollout.prompts_per_step": 8, "optim.batch_size": 4}),
    "ppo-2x2": (PPOConfig, {"rollout.prompts_per_step": 8, "epochs": 2, "mini_batches": 2, "optim.batch_size": 2}),
    "grpo": (GRPOConfig, {"rollout.prompts_per_step": 4, "kl.coef": 0.05, "kl.ref_cache_mb": 64.0}),
    "grpo-it2": (GRPOConfig, {"rollout.prompts_per_step": 4, "iterations": 2, "kl.coef": 0.05}),
    "rloo": (RLOOConfig, {"rollout.prompts_per_step": 4, "kl.coef": 0.05, "kl.ref_cache_mb": 64.0}),
    "reinforce": (REINFORCEConfig, {"rollout.prompts_per_step": 8, "kl.coef": 0.05}),
    # LoRA: the policy samples from its merged copy (accel/lora.py), the critic's backbone has adapters too
    "grpo-lora": (GRPOConfig, {"rollout.prompts_per_step": 4, "kl.coef": 0.05, "model.lora_r": 4,
                               "model.lora_alpha": 8.0, "optim.lr": 3e-2}),
    "ppo-lora": (PPOConfig, {"rollout.prompts_per_step": 8, "optim.batch_size": 4, "model.lora_r": 4,
                             "model.lora_alpha": 8.0, "optim.lr": 3e-2}),
}


def gpt2_dir(root, tok) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=4, n_embd=64, n_positions=128, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    d = root / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def policies(tmp_path_factory, tiny_tokenizer):
    from rlhfkit.config import ModelConfig

    root = tmp_path_factory.mktemp("accel")
    llama = make_policy_dir(root, tiny_tokenizer, ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                                              max_seq_len=64))
    return {"gpt2": gpt2_dir(root, tiny_tokenizer), "llama": llama, "prompts": write_prompts(root)}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in ("final", "final_critic"):
        for f in sorted((run_dir / name).glob("*.safetensors")):
            out.update({f"{name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def run_rl(cls, policy, prompts, run_dir, accel, over):
    from importlib import import_module

    cfg = rl_cfg(cls, policy, prompts, run_dir, **{"optim.max_steps": STEPS, "optim.grad_clip": 1.0,
                                                   "run.accel": accel, **over})
    module = {PPOConfig: "ppo", GRPOConfig: "grpo", RLOOConfig: "rloo", REINFORCEConfig: "reinforce"}[cls]
    import_module(f"rlhfkit.rl.{module}").train(cfg)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "rollout/reward_mean" in r]
    return rows, final_weights(run_dir)


def assert_equivalent(fast, plain, start, what, same_samples: int):
    """Compare two runs over their first `same_samples` steps (those whose samples were identical)."""
    (rows_a, w_a), (rows_b, w_b) = fast, plain
    assert len(rows_a) == len(rows_b) == STEPS
    assert same_samples >= 1, (what, "the first step's samples differ")
    for ra, rb in list(zip(rows_a, rows_b))[:same_samples]:
        rel = 1e-4 if ra["step"] == 1 else 1e-2
        assert ra["rollout/reward_mean"] == rb["rollout/reward_mean"], (what, ra["step"], "rewards")
        for k in KEYS:
            if k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (what, ra["step"], k, ra[k], rb[k])
        if "ppo/clipfrac" in rb:
            one_token = 1.0 / ra["rollout/tokens"]
            assert abs(ra["ppo/clipfrac"] - rb["ppo/clipfrac"]) <= one_token + 1e-9, (what, ra["step"], "clipfrac")
    if same_samples < STEPS:
        return
    assert w_a.keys() == w_b.keys()
    keys = [k for k in w_b if k in start]  # the policy's (the critic is checked through its losses and values)
    assert keys
    diff = sum(float((w_a[k] - w_b[k]).double().square().sum()) for k in keys) ** 0.5
    update = sum(float((w_b[k] - start[k]).double().square().sum()) for k in keys) ** 0.5
    assert update > 0, what
    assert diff <= 1e-3 * update, (what, "final weights", diff, update)


@pytest.fixture
def samples(monkeypatch):
    """The completion token ids of every rollout of the runs in a test, in order."""
    from rlhfkit.rl import rollout

    seen: list[torch.Tensor] = []
    real = rollout.Sampler.__call__

    def call(self, *args, **kwargs):
        ro = real(self, *args, **kwargs)
        seen.append(ro.completion_ids.clone())
        return ro

    monkeypatch.setattr(rollout.Sampler, "__call__", call)
    return seen


def steps_with_same_samples(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n].shape == b[n].shape and torch.equal(a[n], b[n]):
        n += 1
    return n


def start_weights(policy: str) -> dict[str, torch.Tensor]:
    """The policy's weights before training, under final_weights' names."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(policy).glob("*.safetensors")):
        out.update({f"final/{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_plain_path(case, family, policies, samples, tmp_path):
    cls, over = CASES[case]
    fast = run_rl(cls, policies[family], policies["prompts"], tmp_path / "auto", "auto", over)
    fast_samples = list(samples)
    samples.clear()
    plain = run_rl(cls, policies[family], policies["prompts"], tmp_path / "off", "off", over)
    same = steps_with_same_samples(fast_samples, samples)
    assert_equivalent(fast, plain, start_weights(policies[family]), f"{case} {family}", same)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dpo_fast_path_equals_plain_path(family, policies, tmp_path):
    """DPO's accelerated path is our log-prob kernels (the reference's pass and the training backward)."""
    from rlhfkit.train.dpo import train
    from tests.test_dpo import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl")
    runs = {}
    for accel in ("auto", "off"):
        cfg = DPOConfig()
        cfg.model.name_or_path = policies[family]
        cfg.data.source = pairs
        cfg.optim.lr, cfg.optim.batch_size, cfg.optim.max_steps, cfg.optim.grad_clip = 1e-3, 8, STEPS, 1.0
        cfg.log.run_dir, cfg.log.log_every, cfg.log.eval_every = str(tmp_path / accel), 1, 0
        cfg.log.tensorboard = cfg.log.progress = False
        cfg.run.threads, cfg.run.accel = 1, accel
        check_config(cfg)
        train(cfg)
        rows = [r for r in read_jsonl(tmp_path / accel / "metrics.jsonl") if "dpo/margin" in r]
        runs[accel] = rows, final_weights(tmp_path / accel)
    (rows_a, w_a), (rows_b, w_b) = runs["auto"], runs["off"]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    for ra, rb in zip(rows_a, rows_b):
        rel = 1e-4 if ra["step"] == 1 else 1e-2  # as the RL trainers' (module docstring)
        for k in ("loss/train", "dpo/margin", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (family, ra["step"], k, ra[k], rb[k])
    start = start_weights(policies[family])
    keys = [k for k in w_b if k in start]
    diff = sum(float((w_a[k] - w_b[k]).double().square().sum()) for k in keys) ** 0.5
    update = sum(float((w_b[k] - start[k]).double().square().sum()) for k in keys) ** 0.5
    assert update > 0 and diff <= 1e-3 * update, (family, diff, update)
