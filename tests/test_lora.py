"""LoRA: only adapters train, checkpoints resume exactly, final/ is a merged plain HF model."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rlhfkit.config import SFTConfig, from_dict
from rlhfkit.errors import ConfigError
from rlhfkit.models.factory import build_model
from rlhfkit.train import sft
from rlhfkit.utils.checkpoint import save_model
from rlhfkit.utils.logging import read_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, vader_texts):
    from rlhfkit.config import ModelConfig

    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    save_model(d / "base", build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=96),
                                       tiny_tokenizer), tiny_tokenizer)
    (d / "pairs.jsonl").write_text("\n".join(json.dumps({"prompt": t[:50], "response": " I liked it."})
                                            for t in vader_texts[:300]) + "\n")
    return d


def cfg(d, run, steps, lr=1e-2, **model):
    return from_dict(SFTConfig, {
        "model": {"name_or_path": str(d / "base"), "lora_r": 4, "lora_alpha": 8, **model},
        "data": {"source": str(d / "pairs.jsonl"), "template": "plain", "max_len": 48},
        "optim": {"lr": lr, "batch_size": 8, "max_steps": steps, "warmup_steps": 1},
        "log": {"run_dir": str(run), "log_every": 1, "eval_every": 0, "save_every": 3, "tensorboard": False},
        "run": {"device": "cpu"}, "sample_prompts": ["The"]})


def test_lora_trains_adapters_only_and_saves_merged(setup, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    before = sft.train(cfg(setup, tmp_path / "zero", 1, lr=1e-9))["best_val_loss"]
    s = sft.train(cfg(setup, tmp_path / "r", 60, lr=3e-2))
    base = load_file(str(setup / "base" / "model.safetensors"))
    final = tmp_path / "r" / "final"
    assert not (final / "adapter_config.json").exists()
    merged = load_file(str(final / "model.safetensors"))
    assert merged.keys() == base.keys()  # a plain model: no lora_A/lora_B tensors
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    # Adapters sit on linear layers only: embeddings and norms are untouched, projections moved.
    assert changed and all("proj" in k for k in changed)
    assert "model.embed_tokens.weight" not in changed
    model = AutoModelForCausalLM.from_pretrained(final)
    # Adapters on a frozen *random* base learn slowly (about 6.2 -> 5.1 here), but they do learn.
    assert s["best_val_loss"] < 0.88 * before and model.config.model_type == "llama"


def test_lora_resume_is_exact(setup, tmp_path, monkeypatch):
    import os
    import signal

    sft.train(cfg(setup, tmp_path / "ref", 6))
    real = sft.MetricLogger.log

    def interrupt(self, metrics, step, **kw):
        real(self, metrics, step, **kw)
        if step == 4 and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sft.MetricLogger, "log", interrupt)
    sft.train(cfg(setup, tmp_path / "run", 6))
    ck = tmp_path / "run" / "checkpoints" / "step-000004" / "model"
    assert (ck / "adapter_config.json").exists()  # checkpoints keep the adapters, not a merged copy
    monkeypatch.setattr(sft.MetricLogger, "log", real)
    sft.train(cfg(setup, tmp_path / "run", 6))

    def losses(d):
        return [r["loss/train"] for r in read_jsonl(d / "metrics.jsonl") if "loss/train" in r]

    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_bad_lora_targets(setup, tmp_path):
    with pytest.raises(ConfigError, match="lora_targets"):
        sft.train(cfg(setup, tmp_path / "x", 1, lora_targets="no_such_module"))


# --------------------------------------------------------------------------------------------------
# RL with LoRA: adapters train, the reference is the base (adapters disabled), resume is exact
# --------------------------------------------------------------------------------------------------
def test_lora_reference_is_the_base_with_adapters_disabled(tmp_path, tiny_tokenizer, tiny_model_cfg):
    from rlhfkit.config import ModelConfig
    from rlhfkit.rl.common import load_policy, policy_and_reference, reference_logprobs
    from rlhfkit.rl.rollout import SamplingParams, completion_logprobs, generate
    from tests.rl_utils import make_policy_dir

    path = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    policy, ref = policy_and_reference(ModelConfig(name_or_path=path, lora_r=4, lora_alpha=8), 0.05, torch.device("cpu"))
    assert ref is None  # no second copy of the weights
    assert {n for n, p in policy.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():  # move the adapters off zero, so the policy differs from its base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    ids = [tiny_tokenizer(t)["input_ids"] for t in ("The movie", "I think it")]
    ro = generate(policy, tiny_tokenizer, ids, SamplingParams(max_new_tokens=6), n=2)
    base = load_policy(path, "float32", torch.device("cpu"), trainable=False)
    want = completion_logprobs(base, ro)[0]
    from rlhfkit.accel import fastdecode

    calls = []
    real = fastdecode.LlamaDecoder.replay
    fastdecode.LlamaDecoder.replay = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:  # the accelerated forward of the base model (adapters off), then the plain one (peft's)
        got = reference_logprobs(policy, None, ro, 1.0, batch_size=2)
    finally:
        fastdecode.LlamaDecoder.replay = real
    assert calls
    plain = reference_logprobs(policy, None, ro, 1.0, batch_size=2, logprobs=completion_logprobs)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(plain, want, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(completion_logprobs(policy, ro)[0], want, atol=1e-3)  # adapters back on


def test_lora_ppo_trains_adapters_resumes_exactly_and_saves_merged(tmp_path, tiny_tokenizer, tiny_model_cfg):
    from safetensors.torch import load_file

    from rlhfkit.config import PPOConfig
    from rlhfkit.rl import ppo
    from tests.rl_utils import make_policy_dir, rl_cfg, write_prompts

    policy, prompts = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg), write_prompts(tmp_path)
    over = {"model.lora_r": 4, "model.lora_alpha": 8.0, "rollout.prompts_per_step": 8,
            "rollout.samples_per_prompt": 1, "optim.lr": 1e-2, "log.save_every": 2}
    full = tmp_path / "full"
    ppo.train(rl_cfg(PPOConfig, policy, prompts, full, **{**over, "optim.max_steps": 4}))
    split = tmp_path / "split"
    ppo.train(rl_cfg(PPOConfig, policy, prompts, split, **{**over, "optim.max_steps": 2}))
    ckpt = split / "checkpoints" / "step-000002"
    assert (ckpt / "model" / "adapter_config.json").exists()  # adapters only, not a second base
    ppo.train(rl_cfg(PPOConfig, policy, prompts, split, **{**over, "optim.max_steps": 4}))
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss/policy", "loss/value", "rollout/reward_mean", "kl/mean", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    assert abs(a[0]["kl/mean"]) < 1e-5  # adapters start at zero: the policy is its reference
    assert a[-1]["kl/mean"] != pytest.approx(0.0, abs=1e-4)  # ... and moves away from it
    merged = load_file(str(full / "final" / "model.safetensors"))
    base = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert merged.keys() == base.keys()  # a plain HF model
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)
    from rlhfkit.models.heads import ScalarHeadModel

    assert ScalarHeadModel.from_pretrained(full / "final_critic") is not None  # merged critic, plain HF


def test_mfu_counts_frozen_base_weights_at_4_flops_per_token(tiny_tokenizer, tiny_model_cfg):
    """LoRA's frozen base weights need the forward and the activation gradients (4N), not the weight
    gradients: MFU would be overstated with 6N."""
    from rlhfkit.models.factory import apply_lora, count_params
    from rlhfkit.utils.runtime import model_flops_per_token

    assert model_flops_per_token(100, 2, 8, 4) == 6 * 100 + 12 * 2 * 8 * 4
    assert model_flops_per_token(100, 2, 8, 4, frozen=40) == 6 * 60 + 4 * 40 + 12 * 2 * 8 * 4
    model = build_model(tiny_model_cfg, tiny_tokenizer)
    assert count_params(model, frozen_only=True) == 0
    n = count_params(model)
    lora = apply_lora(model, dataclasses.replace(tiny_model_cfg, lora_r=4))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert count_params(lora, frozen_only=True) == n and count_params(lora) == n + trainable
