"""LoRA: only adapters train, checkpoints resume exactly, final/ is a merged plain HF model."""
from __future__ import annotations

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
