"""SFT: the prompt is masked out of the loss, accumulation is exact with variable lengths, it learns."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.config import SFTConfig, from_dict
from rlhfkit.data.datasets import collate_sft, encode_pair
from rlhfkit.errors import DataError
from rlhfkit.train import sft
from rlhfkit.utils.checkpoint import save_model
from rlhfkit.utils.logging import read_jsonl


def test_encode_pair_plain_and_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, n_prompt = encode_pair(tok, "Q: hi", " A: yo", "plain", 64)
    p = tok("Q: hi")["input_ids"]
    r = tok(" A: yo", add_special_tokens=False)["input_ids"]
    assert ids == p + r + [tok.eos_token_id] and n_prompt == len(p)
    b = collate_sft([(ids, n_prompt)], tok.pad_token_id)
    # labels are the next tokens; the mask is 1 exactly on response tokens and the closing EOS.
    assert b["labels"][0].tolist() == ids[1:]
    assert b["loss_mask"][0].tolist() == [0.0] * (n_prompt - 1) + [1.0] * (len(r) + 1)


def test_encode_pair_truncates_prompt_start_then_response_end(tiny_tokenizer):
    tok = tiny_tokenizer
    full, n = encode_pair(tok, "one two three four five six", " seven eight", "plain", 1000)
    ids, n2 = encode_pair(tok, "one two three four five six", " seven eight", "plain", len(full) - 2)
    assert ids == full[2:] and n2 == n - 2  # the prompt lost its first two tokens
    r_len = len(full) - n
    ids, n3 = encode_pair(tok, "one two three four five six", " seven eight", "plain", r_len - 1)
    assert n3 == 1 and len(ids) == r_len - 1 and ids[1:] == full[n:n + r_len - 2]


def test_chat_template_encoding(tiny_tokenizer):
    ids, n = encode_pair(tiny_tokenizer, "hi", "hello", "chat", 64)
    assert tiny_tokenizer.decode(ids[:n]) == "<|user|>\nhi\n<|assistant|>\n"
    assert tiny_tokenizer.decode(ids[n:]) == "hello<|endoftext|>"


def test_loss_counts_response_tokens_only(tiny_model, tiny_tokenizer):
    ex = [encode_pair(tiny_tokenizer, "The movie was", " great fun", "plain", 64),
          encode_pair(tiny_tokenizer, "Hi", " there, how are you", "plain", 64)]
    batch = collate_sft(ex, tiny_tokenizer.pad_token_id)
    got = sft.token_loss_sum(tiny_model, batch)
    want = 0.0
    for ids, n in ex:  # by hand: model on each example alone, CE of each response token
        logits = tiny_model(input_ids=torch.tensor([ids[:-1]])).logits[0]
        ce = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        want += ce[n - 1:].sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, vader_texts):
    # Diverse real prompts, one fixed answer: the response loss can approach 0 only because the prompt
    # (unpredictable text) is masked out of the loss.
    rows = [{"prompt": t[:60], "response": " I liked it."} for t in vader_texts[:400]]
    p = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tiny_tokenizer):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.factory import build_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base") / "model"
    save_model(d, build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=96), tiny_tokenizer),
               tiny_tokenizer)
    return str(d)


def cfg(base, data, run_dir, **optim):
    return from_dict(SFTConfig, {
        "model": {"name_or_path": base}, "data": {"source": data, "template": "plain", "max_len": 48,
                                                  "val_fraction": 0.1},
        "optim": {"lr": 3e-3, "batch_size": 8, "max_steps": 4, "warmup_steps": 1, **optim},
        "log": {"run_dir": str(run_dir), "log_every": 1, "eval_every": 0, "save_every": 0, "tensorboard": False},
        "run": {"device": "cpu"}, "sample_prompts": ["The"]})


def test_grad_accumulation_equivalence_with_variable_lengths(base_model_dir, pairs_file, tmp_path):
    # Adam divides by sqrt(v): for weights whose gradient is ~1e-9, float rounding (different padding,
    # different matmul shapes) would decide the sign of a whole lr-sized update. A larger eps keeps the
    # update proportional to the gradient there, so equal gradients <=> equal weights, within rounding.
    sft.train(cfg(base_model_dir, pairs_file, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=2, eps=1e-4))
    sft.train(cfg(base_model_dir, pairs_file, tmp_path / "b", batch_size=1, grad_accum=8, max_steps=2, eps=1e-4))
    sft.train(cfg(base_model_dir, pairs_file, tmp_path / "c", batch_size=3, grad_accum=3, max_steps=2, eps=1e-4))
    la = [r["loss/train"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss/train" in r]
    lb = [r["loss/train"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss/train" in r]
    assert la == pytest.approx(lb, rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    # 9 rows per step with batch 3 x accum 3 is a different batch, so it must differ: the test can fail.
    wc = load_file(str(tmp_path / "c" / "final" / "model.safetensors"))
    assert any(not torch.allclose(wa[k], wc[k]) for k in wa)


def test_sft_learns(base_model_dir, pairs_file, tmp_path):
    before = sft.train(cfg(base_model_dir, pairs_file, tmp_path / "zero", max_steps=1, lr=1e-9))["best_val_loss"]
    s = sft.train(cfg(base_model_dir, pairs_file, tmp_path / "r", max_steps=60, lr=1e-2))
    assert s["best_val_loss"] < 0.1 * before, (s, before)
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()


def test_sft_resume_after_interrupt_is_exact(base_model_dir, pairs_file, tmp_path, monkeypatch):
    import os
    import signal

    def run(d):
        c = cfg(base_model_dir, pairs_file, d, max_steps=10)
        c.log.save_every = 5
        return sft.train(c)

    run(tmp_path / "ref")
    real_log = sft.MetricLogger.log

    def log_and_interrupt(self, metrics, step, **kw):
        real_log(self, metrics, step, **kw)
        if step == 7 and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sft.MetricLogger, "log", log_and_interrupt)
    assert run(tmp_path / "run")["steps"] == 7
    monkeypatch.setattr(sft.MetricLogger, "log", real_log)
    run(tmp_path / "run")

    def losses(d):
        return [(r["step"], r["loss/train"]) for r in read_jsonl(d / "metrics.jsonl") if "loss/train" in r]

    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 10


def test_chat_template_required_for_chat(base_model_dir, pairs_file, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "nochat"
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    tok.chat_template = None
    import shutil

    shutil.copytree(base_model_dir, d)
    tok.save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    c = cfg(str(d), pairs_file, tmp_path / "x")
    c.data.template = "chat"
    with pytest.raises(DataError, match="has no chat template"):
        sft.train(c)
