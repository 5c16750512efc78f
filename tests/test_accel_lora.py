"""A LoRA policy samples through our decoders from a merged copy (accel/lora.py): the same tokens and
log-probabilities as peft's own forward (rollout.backend=hf), before and after the adapters train with the
production optimizer, so the copy is never stale."""
from __future__ import annotations

import pytest
import torch

from rlhfkit.accel import lora as accel_lora
from rlhfkit.config import ModelConfig, OptimConfig
from rlhfkit.models.factory import apply_lora, build_model, make_optimizer
from rlhfkit.rl.rollout import SamplingParams, completion_logprobs, generate


def _policy(family: str, tok, cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_head=4, n_embd=64, n_positions=128,
                                           bos_token_id=0, eos_token_id=0, pad_token_id=1))
    else:
        cfg.n_kv_head = 2  # grouped-query attention, as SmolLM2
        model = build_model(cfg, tok)
    policy = apply_lora(model, ModelConfig(lora_r=4, lora_alpha=8.0))  # the factory the RL stages use
    # peft starts every B at zero (the adapters add nothing yet): give them values, so the merge matters.
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    from rlhfkit.utils import weights

    weights.changed()
    return policy


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_policy_samples_as_its_peft_forward_before_and_after_an_update(family, tiny_tokenizer,
                                                                           tiny_model_cfg):
    policy = _policy(family, tiny_tokenizer, tiny_model_cfg)
    texts = ["The movie was", "I think that this is", "Bad", "A truly wonderful and moving film about"]
    ids = [tiny_tokenizer(t)["input_ids"] for t in texts]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    g = torch.Generator().manual_seed(0)

    def both():
        u = torch.rand(len(ids) * 2, params.max_new_tokens, generator=g)
        ours = generate(policy, tiny_tokenizer, ids, params, n=2, backend="auto", uniforms=u)
        peft = generate(policy, tiny_tokenizer, ids, params, n=2, backend="hf", uniforms=u)
        assert torch.equal(ours.completion_ids, peft.completion_ids)
        assert torch.equal(ours.completion_mask, peft.completion_mask)
        # Float reassociation only: x W^T + s (x A^T) B^T against x (W + s B A)^T, a few ulps of logits of
        # size ~1 through two blocks.
        assert torch.allclose(ours.logprobs, peft.logprobs, atol=1e-5, rtol=1e-5)
        return ours

    first = both()
    kept = accel_lora._COPIES.get(policy)
    assert kept is not None  # our decoder sampled, from the merged copy
    # The production optimizer (fused AdamW) on the adapters; the copy must follow the new weights.
    opt = make_optimizer(policy, OptimConfig(lr=5e-2, weight_decay=0.0))
    lp, _ = completion_logprobs(policy, first)
    (-(lp * first.completion_mask).sum()).backward()
    opt.step()
    second = both()
    assert accel_lora._COPIES[policy][1] is kept[1]  # refreshed in place, not rebuilt
    again = generate(policy, tiny_tokenizer, ids, params, n=2, backend="hf",
                     uniforms=torch.rand(len(ids) * 2, params.max_new_tokens, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(again.logprobs, first.logprobs) and second is not None  # the update did move it


def test_adapters_off_or_merged_sample_through_peft(tiny_tokenizer, tiny_model_cfg):
    """The reference of a LoRA run is the policy with its adapters off: that is not the merged copy."""
    policy = _policy("llama", tiny_tokenizer, tiny_model_cfg)
    assert accel_lora.merged(policy) is not None
    with policy.disable_adapter():
        assert accel_lora.merged(policy) is None
    policy.merge_adapter()
    assert accel_lora.merged(policy) is None
