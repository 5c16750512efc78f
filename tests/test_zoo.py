"""Named models that ship in packages: SmolLM2 converts once, loads offline and answers sensibly."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers():
    from rlhfkit.config import TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm
    from rlhfkit.models.zoo import resolve_model

    path = resolve_model("smollm2")  # ~20 s the first time (fetch + dequantise), then a plain directory
    assert path.endswith("smollm2")
    tok = get_tokenizer(TokenizerConfig(), "smollm2")
    model = load_causal_lm("smollm2").eval()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_unknown_names_pass_through():
    from rlhfkit.models.zoo import resolve_model

    assert resolve_model("runs/pretrain/final") == "runs/pretrain/final"


@pytest.mark.slow
def test_smollm2_lora_ppo_completes_and_saves_a_merged_model_that_answers(tmp_path):
    """A short LoRA PPO run on the real model (2 steps, 4 prompts x 1 sample, 8 new tokens): ~20 s on one
    busy CPU core, most of it loading the 135M model twice (policy, critic) and saving final/."""
    import time

    from transformers import AutoModelForCausalLM

    from rlhfkit.config import PPOConfig, TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer
    from rlhfkit.rl import ppo
    from rlhfkit.utils.logging import read_jsonl
    from tests.rl_utils import rl_cfg

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is your favourite colour?\nTell me about the sea.\nName a fruit.\nHow are you?\n")
    cfg = rl_cfg(PPOConfig, "smollm2", str(prompts), tmp_path / "ppo", **{
        "model.lora_r": 8, "data.template": "chat", "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 1,
        "rollout.max_new_tokens": 8, "optim.max_steps": 2, "optim.batch_size": 4, "optim.lr": 1e-4})
    t0 = time.time()
    summary = ppo.train(cfg)
    print(f"smollm2 LoRA PPO, 2 steps: {time.time() - t0:.1f}s")
    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and abs(rows[0]["kl/mean"]) < 1e-4  # reference = base
    # final/ is a plain (merged) HF model: it loads without peft and still answers a question.
    model = AutoModelForCausalLM.from_pretrained(summary["final_model"]).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    tok = get_tokenizer(TokenizerConfig(), summary["final_model"])
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_lora_sft_smoke(tmp_path):
    """Chat-template SFT with LoRA on the real model: 3 steps of 4 pairs; the loss goes down on the seen
    pairs and final/ is a merged model."""
    import json

    from rlhfkit.config import SFTConfig, from_dict
    from rlhfkit.train import sft
    from rlhfkit.utils.logging import read_jsonl

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"Say hello number {i}.", "response": "Hello there, friend!"})
                               for i in range(40)) + "\n")
    cfg = from_dict(SFTConfig, {
        "model": {"name_or_path": "smollm2", "lora_r": 8, "lora_alpha": 16},
        "data": {"source": str(pairs), "template": "chat", "max_len": 48, "val_fraction": 0.1},
        "optim": {"lr": 2e-3, "batch_size": 4, "max_steps": 3, "warmup_steps": 0},
        "log": {"run_dir": str(tmp_path / "sft"), "log_every": 1, "eval_every": 3, "save_every": 0,
                "tensorboard": False, "progress": False},
        "run": {"device": "cpu", "threads": 1}, "sample_prompts": ["Say hello number 99."]})
    summary = sft.train(cfg)
    losses = [r["loss/train"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss/train" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(str(tmp_path / "sft" / "final" / "model.safetensors")))
    assert summary["steps"] == 3


@pytest.mark.slow
def test_smollm2_deep_lora_reward_model_learns_and_scores(tmp_path):
    """A deep reward model on the SmolLM2 backbone with LoRA: 10 steps of 8 rated texts (~17 s); it ranks
    held-out texts with the raters and loads back behind the reward interface."""
    import json

    import numpy as np

    from rlhfkit.config import RewardConfig, from_dict
    from rlhfkit.models.reward import load_reward
    from rlhfkit.train import reward as R
    from tests.test_reward import synthetic_texts

    rng = np.random.default_rng(0)
    recs = [{"prompt": "", "completion": t, "item_id": f"t{i}", "annotator": f"a{a}",
             "rating": float(np.clip(round(s + rng.normal(0, 0.5)), -4, 4))}
            for i, (t, s) in enumerate(synthetic_texts(300, 0)) for a in range(3)]
    data = tmp_path / "ratings.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = from_dict(RewardConfig, {
        "model": {"kind": "deep", "backbone": "smollm2", "lora_r": 8, "pooling": "last"},
        "data": {"source": [str(data)]}, "loss": {"kind": "regression"},
        "optim": {"lr": 1e-3, "max_steps": 10, "batch_size": 8, "warmup_steps": 1},
        "log": {"run_dir": str(tmp_path / "rm"), "eval_every": 10, "log_every": 5, "save_every": 0,
                "tensorboard": False, "progress": False},
        "run": {"device": "cpu", "threads": 1}})
    summary = R.train(cfg)
    assert summary["test"]["all"]["pearson"] > 0.5
    rm = load_reward(summary["model"])
    r = rm(["", ""], ["A wonderful, brilliant and lovely film", "A terrible, awful and boring film"])
    assert r.shape == (2,) and torch.isfinite(r).all()
