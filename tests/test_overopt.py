"""The over-optimisation curve: proxy and gold reward of an RL run's checkpoints vs their KL to the
reference, on the same prompts with the same seed."""
from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.config import EvalConfig, PromptDataConfig, RolloutConfig
from rlhfkit.eval.overopt import checkpoints, eval_config_for_curve, overopt_curve
from tests.rl_utils import make_policy_dir, write_prompts


def _fake_checkpoint(run_dir, step: int, model_dir: str, noise: float):
    from rlhfkit.models.factory import load_causal_lm

    d = run_dir / "checkpoints" / f"step-{step:06d}"
    model = load_causal_lm(model_dir)
    torch.manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.save_pretrained(d / "model")
    torch.save({}, d / "trainer_state.pt")


def test_curve_of_checkpoints(tmp_path, tiny_tokenizer, tiny_model_cfg):
    ref = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    run = tmp_path / "ppo"
    _fake_checkpoint(run, 10, ref, noise=0.0)   # the reference itself, saved again
    _fake_checkpoint(run, 20, ref, noise=0.05)  # moved away from it
    assert [s for s, _ in checkpoints(run)] == [10, 20]
    base = EvalConfig(reference=ref, reward="rule:length", gold="rule:vowels",
                      data=PromptDataConfig(source=write_prompts(tmp_path), max_prompts=200),
                      rollout=RolloutConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6))
    cfg = eval_config_for_curve(base, n_prompts=6, samples=1)
    assert (cfg.data.max_prompts, cfg.rollout.samples_per_prompt, base.data.max_prompts) == (6, 1, 200)

    rows = overopt_curve(checkpoints(run), cfg, run / "overopt.jsonl")
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert [json.loads(line)["step"] for line in (run / "overopt.jsonl").read_text().splitlines()] == [0, 10, 20]
    assert all(r["n_prompts"] == 6 for r in rows)
    # Same weights, same seed: same samples, so the same rewards and a KL of exactly 0.
    assert rows[1]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["proxy"] == rows[0]["proxy"] and rows[1]["gold"] == rows[0]["gold"]
    assert rows[1]["ref_ppl"] == pytest.approx(rows[0]["ref_ppl"]) and rows[1]["distinct_2"] == rows[0]["distinct_2"]
    # A random 512-token model: its own samples' perplexity is near the vocabulary size, finite and > 1.
    assert 1.0 < rows[0]["ref_ppl"] < 5000 and 0 < rows[0]["distinct_2"] <= 1 and rows[0]["length"]["mean"] > 0
    assert rows[2]["kl"]["mean"] > 0.01 and rows[2]["kl"]["low"] <= rows[2]["kl"]["mean"] <= rows[2]["kl"]["high"]


def test_curve_needs_both_rewards(tmp_path):
    with pytest.raises(ValueError, match="needs a reference, a proxy reward and a gold reward"):
        overopt_curve([], EvalConfig(reference="r", reward="rule:length"), tmp_path / "o.jsonl")


def test_a_lora_checkpoint_is_merged_into_the_reference(tmp_path, tiny_tokenizer, tiny_model_cfg):
    from rlhfkit.config import ModelConfig
    from rlhfkit.eval.overopt import _load_checkpoint
    from rlhfkit.models.factory import apply_lora, load_causal_lm

    ref = make_policy_dir(tmp_path, tiny_tokenizer, tiny_model_cfg)
    lora = apply_lora(load_causal_lm(ref), ModelConfig(lora_r=4, lora_alpha=8.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # B starts at 0 (adapters off): move it so the checkpoint differs
                p.add_(0.1 * torch.randn_like(p))
    lora.save_pretrained(tmp_path / "ckpt")  # adapters only, as an RL checkpoint of a LoRA run
    assert (tmp_path / "ckpt" / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 3]])
    merged = _load_checkpoint(tmp_path / "ckpt", ref)
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        assert not torch.allclose(load_causal_lm(ref)(input_ids=ids).logits, want, atol=1e-3)
