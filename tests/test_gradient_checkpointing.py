"""model.gradient_checkpointing recomputes activations in backward: the same loss and the same gradients
as without it, for the causal LM (pretrain, SFT), the RL training forward (grouped prompts), LoRA adapters
and the scalar-head models (deep reward model, PPO critic)."""
from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.models.factory import apply_lora, build_model, enable_gradient_checkpointing


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, rel: float = 1e-5):
    """Each gradient within `rel` of its tensor's largest entry: an entry is a sum over positions of terms
    of about that size, so reordering the sum (another kernel, another CPU) moves it by about
    sqrt(positions) * 6e-8 of that size in fp32, not by a fraction of its own (possibly cancelled) value."""
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        scale = float(gb[n].abs().max())
        assert torch.allclose(ga[n], gb[n], atol=rel * scale + 1e-12, rtol=0), (n, float((ga[n] - gb[n]).abs().max()), scale)


def is_checkpointing(model):
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@pytest.mark.parametrize("lora", [False, True])
def test_causal_lm_loss_and_gradients_are_unchanged(tiny_tokenizer, lora):
    from rlhfkit.models.ops import causal_lm_loss

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=64, lora_r=4 if lora else 0, lora_alpha=8)
    plain = build_model(cfg, tiny_tokenizer).train()
    if lora:  # adapters off zero, so they get a gradient through the frozen base
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    ckpt = copy.deepcopy(plain)
    enable_gradient_checkpointing(ckpt)
    assert is_checkpointing(ckpt) and not is_checkpointing(plain)
    x = torch.randint(0, len(tiny_tokenizer), (4, 33))
    losses = []
    for m in (plain, ckpt):
        loss, _ = causal_lm_loss(m(input_ids=x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert_same_grads(plain, ckpt)
    if lora:
        assert all("lora_" in n for n in grads(ckpt))


def test_rl_training_forward_is_unchanged(tiny_model, tiny_tokenizer):
    """Groups of completions share their prompt's KV cache in the plain forward; a checkpointed model cannot
    keep a cache and takes the one-pass route: same log-probs, same gradients."""
    from rlhfkit.rl.rollout import SamplingParams, completion_logprobs, generate

    torch.manual_seed(0)
    ids = [tiny_tokenizer(t)["input_ids"] for t in ("The movie was", "I think")]
    ro = generate(tiny_model, tiny_tokenizer, ids, SamplingParams(max_new_tokens=8), n=3)
    plain = tiny_model.train()
    ckpt = enable_gradient_checkpointing(copy.deepcopy(plain)).train()
    out = []
    for m in (plain, ckpt):
        lp, ent = completion_logprobs(m, ro, with_entropy=True, entropy_grad=True)
        (lp.sum() - 0.1 * ent.sum()).backward()
        out.append(lp.detach())
    assert torch.allclose(out[0], out[1], atol=1e-5)
    # The two routes sum in different orders (a shared prompt cache vs one pass): compare at fp32's
    # rounding of sums over the 48 completion positions, relative to each gradient's scale.
    assert_same_grads(plain, ckpt)


@pytest.mark.parametrize("lora", [False, True])
def test_scalar_head_backbone_gradients_are_unchanged(tiny_model, lora):
    from rlhfkit.models.heads import ScalarHeadModel

    torch.manual_seed(0)
    plain = ScalarHeadModel.from_causal_lm(tiny_model, init_std=0.1).train()
    ckpt = copy.deepcopy(plain)
    enable_gradient_checkpointing(ckpt.backbone)
    if lora:
        cfg = ModelConfig(lora_r=4, lora_alpha=8)
        plain.backbone = apply_lora(plain.backbone, cfg, causal_lm=False)
        torch.manual_seed(1)
        ckpt.backbone = apply_lora(ckpt.backbone, cfg, causal_lm=False)
        ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 100, (3, 12))
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding in one row
    for m in (plain, ckpt):
        m.score(x, mask).square().sum().backward()
    assert_same_grads(plain, ckpt)


def test_grpo_run_is_the_same_with_gradient_checkpointing(tmp_path, tiny_tokenizer, tiny_model_cfg):
    from rlhfkit.config import GRPOConfig
    from rlhfkit.rl import grpo
    from rlhfkit.utils.logging import read_jsonl
    from tests.rl_utils import make_policy_dir, rl_cfg, write_prompts

    policy, prompts = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg), write_prompts(tmp_path)
    runs = []
    for gc in (False, True):
        d = tmp_path / f"gc{int(gc)}"
        grpo.train(rl_cfg(GRPOConfig, policy, prompts, d, **{"optim.max_steps": 3, "kl.coef": 0.05,
                                                                 "model.gradient_checkpointing": gc}))
        runs.append(read_jsonl(d / "metrics.jsonl"))
    for a, b in zip(*runs, strict=True):
        for k in ("loss/policy", "rollout/reward_mean", "kl/mean", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
