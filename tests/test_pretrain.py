"""Pretraining: exact resume, grad-accumulation equivalence, NaN stop, and that it really learns."""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from rlhfkit.config import PretrainConfig, from_dict
from rlhfkit.errors import TrainingError
from rlhfkit.train import pretrain
from rlhfkit.utils.logging import read_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, vader_texts):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(vader_texts[:1500]) + "\n")
    return str(p)


def tiny_cfg(corpus, run_dir, **over) -> PretrainConfig:
    d = {"model": {"n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 32},
         "tokenizer": {"vocab_size": 300},
         "data": {"source": corpus, "seq_len": 32, "val_fraction": 0.1},
         "optim": {"lr": 3e-3, "batch_size": 8, "max_steps": 12, "warmup_steps": 2},
         "log": {"run_dir": str(run_dir), "log_every": 1, "eval_every": 6, "save_every": 4,
                 "tensorboard": False},
         "run": {"device": "cpu", "seed": 3}, "sample_prompts": ["The"], "eval_sequences": 16}
    for k, v in over.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return from_dict(PretrainConfig, d)


def losses(run_dir):
    return {r["step"]: r["loss/train"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss/train" in r}


def test_block_sampler_visits_every_block_once_per_epoch():
    s = pretrain.BlockSampler(np.arange(1000, dtype=np.int32), 10, seed=0)
    assert s.n == 99
    b = s.batch(0, s.n)  # one full epoch
    starts = b[:, 0].numpy()
    off = starts.min() % 10
    assert sorted((starts - off) // 10) == list(range(99))
    assert torch.equal(b[:, 1:], b[:, :-1] + 1)  # contiguous windows of the stream
    assert torch.equal(s.batch(5, 3), b[5:8])    # any position is reproducible on its own


def test_unigram_ppl_by_hand():
    # Train counts (+1 smoothing) over vocab 3: token 0 x3, token 1 x1 -> [4, 2, 1] / 7.
    ppl = pretrain.unigram_ppl(np.array([0, 0, 0, 1]), np.array([0, 1]), 3)
    assert ppl == pytest.approx(math.exp(-(math.log(4 / 7) + math.log(2 / 7)) / 2))


def test_resume_after_interrupt_reproduces_the_uninterrupted_run(corpus, tmp_path, monkeypatch):
    # Dropout on: the resumed run must also continue the same random stream, not only the same data.
    drop = {"model": {"dropout": 0.1}}
    ref = tmp_path / "ref"
    pretrain.train(tiny_cfg(corpus, ref, **drop))
    # Same run, interrupted by a SIGINT during step 7 (after its metrics are logged): the loop finishes
    # the step, writes a checkpoint and returns; the second call resumes from it.
    run = tmp_path / "run"
    real_log = pretrain.MetricLogger.log

    def log_and_interrupt(self, metrics, step, **kw):
        real_log(self, metrics, step, **kw)
        if step == 7 and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(pretrain.MetricLogger, "log", log_and_interrupt)
    first = pretrain.train(tiny_cfg(corpus, run, **drop))
    assert first["steps"] == 7 and first["stopped_early"]
    monkeypatch.setattr(pretrain.MetricLogger, "log", real_log)
    pretrain.train(tiny_cfg(corpus, run, **drop))
    assert losses(run) == losses(ref)  # bit-exact, every step
    assert len(losses(ref)) == 12


def test_resume_after_a_crash_restarts_from_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    pretrain.train(tiny_cfg(corpus, ref))
    run = tmp_path / "run"
    real = pretrain.causal_lm_loss
    calls = {"n": 0}

    def crash_in_step_10(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10 + 2:  # 9 train steps + 2 eval batches (16 seqs / bs 8) at step 6; step 10
            raise RuntimeError("power cut")
        return real(*a, **k)

    monkeypatch.setattr(pretrain, "causal_lm_loss", crash_in_step_10)
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain.train(tiny_cfg(corpus, run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    monkeypatch.setattr(pretrain, "causal_lm_loss", real)
    pretrain.train(tiny_cfg(corpus, run))  # resumes at step 8; metrics after it are rewritten
    assert losses(run) == losses(ref)


def test_grad_accumulation_equivalence(corpus, tmp_path):
    a = pretrain.train(tiny_cfg(corpus, tmp_path / "a", optim={"batch_size": 8, "grad_accum": 1, "max_steps": 3},
                                log={"save_every": 0, "eval_every": 0}))
    b = pretrain.train(tiny_cfg(corpus, tmp_path / "b", optim={"batch_size": 1, "grad_accum": 8, "max_steps": 3},
                                log={"save_every": 0, "eval_every": 0}))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() and all(la[k] == pytest.approx(lb[k], rel=1e-5) for k in la)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=1e-4)


def test_learns_beyond_the_unigram_floor(corpus, tmp_path):
    s = pretrain.train(tiny_cfg(corpus, tmp_path / "r", optim={"max_steps": 300, "warmup_steps": 5, "lr": 1e-2,
                                                               "batch_size": 16},
                                log={"eval_every": 150, "save_every": 0, "log_every": 50}))
    # A unigram model is the floor any LM must beat; 300 tiny steps get well below it (about 32 vs 59).
    assert s["val_ppl"] < 0.7 * s["unigram_val_ppl"], s
    written = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert written["val_ppl"] == s["val_ppl"]
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "r" / "final" / f).exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final").config.model_type == "llama"


def test_nan_loss_stops_with_a_clear_message(corpus, tmp_path, monkeypatch):
    real = pretrain.causal_lm_loss
    calls = {"n": 0}

    def nan_at_step_6(*a, **k):
        calls["n"] += 1
        loss, n = real(*a, **k)
        return (loss * float("nan"), n) if calls["n"] == 6 else (loss, n)

    monkeypatch.setattr(pretrain, "causal_lm_loss", nan_at_step_6)
    with pytest.raises(TrainingError, match=r"loss is nan at step 6.*Last good checkpoint: .*step-000004"):
        pretrain.train(tiny_cfg(corpus, tmp_path / "r"))


def test_cli_end_to_end(corpus, tmp_path):
    from rlhfkit.cli import main

    rc = main(["pretrain", "--data.source", corpus, "--data.seq_len", "32", "--model.n_layer", "1",
               "--model.d_model", "32", "--model.max_seq_len", "32", "--tokenizer.vocab_size", "280",
               "--optim.max_steps", "3", "--optim.warmup_steps", "1", "--optim.batch_size", "4",
               "--log.run_dir", str(tmp_path / "cli"), "--log.tensorboard", "false", "--sample_prompts", "Hi"])
    assert rc == 0 and (tmp_path / "cli" / "final" / "model.safetensors").exists()
    assert main(["pretrain", "--data.source", str(tmp_path / "missing.jsonl")]) == 2


def test_bf16_autocast_runs_and_tracks_fp32(corpus, tmp_path):
    over = {"optim": {"max_steps": 3}, "log": {"eval_every": 3, "save_every": 0}}
    a = pretrain.train(tiny_cfg(corpus, tmp_path / "fp32", **over))
    b = pretrain.train(tiny_cfg(corpus, tmp_path / "bf16", run={"precision": "bf16"}, **over))
    la, lb = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(abs(la[s] - lb[s]) < 0.02 * la[s] for s in la)  # same training, bf16 rounding only
    assert la != lb  # and the matmuls really ran in bf16
    assert b["val_ppl"] == pytest.approx(a["val_ppl"], rel=0.02)
