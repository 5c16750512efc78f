"""Reward models on long texts: the truncation rule (prompt cut from the left, the completion kept),
identical texts after cutting, tie counting end to end, gzipped exports, evaluating a held-out file or a
saved model, model selection and passes bounded in tokens."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from rlhfkit.config import RewardConfig, from_dict, parse_config
from rlhfkit.data.reward_data import load_reward_data
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.models.reward import load_reward
from rlhfkit.models.reward_text import TextTokenizer
from rlhfkit.train import reward as R
from tests.test_reward import cfg_for, synthetic_texts, write_jsonl

FILLER = "the user said that the weather was fine and then asked about the time of day again . "


@pytest.fixture
def tiny_lm_dir(tmp_path, tiny_model, tiny_tokenizer):
    from rlhfkit.utils.checkpoint import save_model

    return str(save_model(tmp_path / "tiny_lm", tiny_model, tiny_tokenizer))


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    from rlhfkit.models.zoo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


# --------------------------------------------------------------------------------------------------
# The rule, token by token
# --------------------------------------------------------------------------------------------------
def test_left_keeps_the_completion_and_the_end_of_the_prompt(minilm_tok):
    tok = minilm_tok
    prompt, reply = "one two three four five six seven eight", " alpha beta"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(reply, add_special_tokens=False)["input_ids"]
    assert len(p_ids) == 8 and len(c_ids) == 2
    cls, sep = tok.cls_token_id, tok.sep_token_id
    # max_len 7 = [CLS] + 4 prompt tokens + 2 reply tokens + [SEP]: the prompt's last 4 words survive.
    tt = TextTokenizer(tok, 7, "left")
    assert tt.ids([prompt], [reply]) == [[cls] + p_ids[-3:] + c_ids + [sep]][:0] + [[cls] + p_ids[-3:] + c_ids + [sep]]
    st = tt.take_stats()
    assert (st.texts, st.cut, st.prompt_cut, st.completion_cut, st.longest) == (1, 1, 1, 0, 12)
    # right (the old rule): the first 5 content tokens, all of them the prompt's.
    assert TextTokenizer(tok, 7, "right").ids([prompt], [reply]) == [[cls] + p_ids[:5] + [sep]]
    # A completion longer than max_len alone keeps its first tokens, with nothing of the prompt.
    long_reply = " " + " ".join(["alpha"] * 20)
    got = TextTokenizer(tok, 7, "left").ids([prompt], [long_reply])[0]
    assert got == [cls] + [tok.convert_tokens_to_ids("alpha")] * 5 + [sep]
    # A text that fits gets exactly the tokens the tokenizer gives it (no boundary effects).
    for side in ("left", "right", "error"):
        assert TextTokenizer(tok, 64, side).ids([prompt], [reply]) == [tok(prompt + reply)["input_ids"]]
    with pytest.raises(DataError, match="longer than model.max_len=7"):
        TextTokenizer(tok, 7, "error").ids([prompt], [reply])


def test_left_rule_on_a_byte_level_bpe_without_special_tokens(tiny_tokenizer):
    prompt, a, b = FILLER * 10, " great wonderful", " awful boring"
    tt = TextTokenizer(tiny_tokenizer, 16, "left")
    ra, rb = tt.ids([prompt, prompt], [a, b])
    assert len(ra) == len(rb) == 16 and ra != rb
    assert tiny_tokenizer.decode(ra).endswith(a) and tiny_tokenizer.decode(rb).endswith(b)
    right = TextTokenizer(tiny_tokenizer, 16, "right").ids([prompt, prompt], [a, b])
    assert right[0] == right[1]  # the replies are cut off: the two texts are the same


# --------------------------------------------------------------------------------------------------
# End to end: long prompts, different replies
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def long_pairs(tmp_path):
    """Pairs whose prompts are ~180 tokens of the tiny tokenizer (longer than the default max_len 128)
    and whose replies differ in sentiment (learnable); a quarter of the prompts are short."""
    rng = np.random.default_rng(3)
    texts = synthetic_texts(1600, 5)
    recs = []
    for i in range(0, len(texts) - 1, 2):
        (a, sa), (b, sb) = texts[i], texts[i + 1]
        if sa == sb:
            continue
        c, r = (a, b) if sa > sb else (b, a)
        prompt = FILLER * (1 if rng.random() < 0.25 else 12) + "Reply:"
        recs.append({"prompt": prompt, "chosen": " " + c, "rejected": " " + r, "item_id": f"d{i}"})
    n_test = len(recs) // 5
    train = write_jsonl(tmp_path / "train.jsonl", recs[n_test:])
    test = tmp_path / "test.jsonl.gz"
    with gzip.open(test, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[:n_test])
    return train, test, recs


def test_long_prompts_train_without_ties_at_the_default_length(tmp_path, long_pairs, tiny_lm_dir, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path / "cache"))
    train, test, recs = long_pairs
    long_test = sum(r["prompt"].count("weather") > 1 for r in recs[:len(recs) // 5])
    base = {"model": {"kind": "linear", "backbone": tiny_lm_dir, "l2": [1.0]}, "loss": {"kind": "bt"},
            "data": {"source": [str(train)], "test_fraction": 0.0}, "eval": {"file": [str(test)]}}
    s = R.train(cfg_for(tmp_path / "left", **base))
    m = s["eval_files"][str(test)]["comparisons"]
    assert m["n_pairs"] == len(recs) // 5 and m["ties"] == 0 and m["pair_acc"] > 0.85, m
    assert s["truncation"]["train"]["cut"] > 0 and s["truncation"]["train"]["identical_after_cut"] == 0
    out = capsys.readouterr().out
    assert "longer than model.max_len=128" in out and "no test split" not in out
    assert f"test.jsonl.gz comparisons: pair_acc {m['pair_acc']:.3f}" in out and "peak RSS" in out
    # RL scoring goes through the same interface and the same rule: two replies to one long prompt differ.
    long = next(r for r in recs if r["prompt"].count("weather") > 1)
    z = load_reward(s["model"])([long["prompt"]] * 2, [long["chosen"], long["rejected"]])
    assert z[0] - z[1] > 0.1
    # The old rule cuts the replies off every long prompt: those test pairs tie, and the training pairs
    # that became identical are dropped (and counted).
    base["model"]["truncation"] = "right"
    s = R.train(cfg_for(tmp_path / "right", **base))
    m = s["eval_files"][str(test)]["comparisons"]
    assert m["ties"] == long_test > 0 and m["pair_acc"] < 0.5 and m["pair_acc_ties_half"] > m["pair_acc"]
    tr = s["truncation"]["train"]
    assert tr["identical_after_cut"] == tr["cut"] // 2 > 0
    assert s["n"]["train"]["comparisons"] == len(recs) - len(recs) // 5 - tr["identical_after_cut"] - \
        s["n"]["val"]["comparisons"]
    assert "comparisons have identical texts after cutting (dropped from training)" in capsys.readouterr().out
    # The saved model keeps its rule: scoring through the reward interface cuts the same way.
    rm = load_reward(s["model"])
    z = rm([long["prompt"]] * 2, [long["chosen"], long["rejected"]])
    assert abs(z[0] - z[1]) < 1e-5  # the same tokens (up to the last bits of a matrix product)
    assert rm.truncation == "right" and json.loads(
        (tmp_path / "right" / "run" / "final" / "reward_config.json").read_text())["truncation"] == "right"


def test_eval_model_scores_a_file_without_training(tmp_path, long_pairs, tiny_lm_dir, monkeypatch):
    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path / "cache"))
    train, test, recs = long_pairs
    s = R.train(cfg_for(tmp_path / "a", model={"kind": "linear", "backbone": tiny_lm_dir, "l2": [1.0]},
                        loss={"kind": "bt"}, data={"source": [str(train)]}))
    ev = R.train(from_dict(RewardConfig, {"eval": {"model": s["model"], "file": [str(test)]},
                                          "log": {"run_dir": str(tmp_path / "ev")}}))
    m = ev["eval_files"][str(test)]["comparisons"]
    assert m["n_pairs"] == len(recs) // 5 and m["ties"] == 0 and m["pair_acc"] > 0.85
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["eval_files"][str(test)]["comparisons"] == \
        pytest.approx(m, nan_ok=True)
    assert not (tmp_path / "ev" / "final").exists()  # nothing trained


def test_gzipped_exports_read_as_plain_ones(tmp_path, long_pairs):
    _, test, _ = long_pairs
    plain = tmp_path / "test.jsonl"
    plain.write_bytes(gzip.decompress(test.read_bytes()))
    a, b = load_reward_data([str(test)], []), load_reward_data([str(plain)], [])
    assert [(r.key, r.prompt, r.completions) for r in a.rankings] == [(r.key, r.prompt, r.completions)
                                                                      for r in b.rankings]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"prompt": "", "chosen": "a", "rejected": "b"}\n{"prompt": 3}\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: field 'prompt' must be a string"):
        load_reward_data([str(bad)], [])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.jsonl\.gz"):
        load_reward_data([str(tmp_path / "x.csv")], [])


# --------------------------------------------------------------------------------------------------
# Deep: passes bounded in tokens, selection
# --------------------------------------------------------------------------------------------------
def test_passes_bound_the_padded_size_and_keep_every_example():
    ex = [R.Example([("", "a"), ("", "b")]) for _ in range(5)]
    rows = [[0] * n for n in (3, 5, 2, 2, 9, 1, 4, 4, 2, 2)]
    parts = R.passes(ex, rows, 12)
    # (3, 5) -> 2 x 5 = 10; + (2, 2) would be 4 x 5 = 20 > 12; (2, 2) + (9, 1) = 36 > 12 ...
    assert [len(p) for p, _ in parts] == [1, 1, 1, 1, 1]
    # Budget 40: (3, 5) + (2, 2) = 4 x 5 = 20; + (9, 1) = 6 x 9 = 54 > 40, so a new pass: (9, 1) + (4, 4)
    # = 4 x 9 = 36; + (2, 2) = 54 > 40: the last example alone.
    parts = R.passes(ex, rows, 40)
    assert [len(p) for p, _ in parts] == [2, 2, 1] and [r for _, rs in parts for r in rs] == rows
    assert [len(p) for p, _ in R.passes(ex, rows, 0)] == [5]


def test_passes_give_the_same_step_as_one_pass(tmp_path, long_pairs, tiny_lm_dir):
    train, _, _ = long_pairs
    logged = []
    for tpp in (0, 300):  # one pass of 16 pairs x 2 texts x up to 48 tokens, or passes of <= 300 tokens
        cfg = cfg_for(tmp_path / str(tpp), model={"kind": "deep", "backbone": tiny_lm_dir, "max_len": 48,
                                                  "tokens_per_pass": tpp},
                      data={"source": [str(train)], "max_items": 64}, loss={"kind": "bt"},
                      optim={"lr": 1e-2, "max_steps": 1, "warmup_steps": 0, "batch_size": 16},
                      log={"eval_every": 0, "log_every": 1})
        R.train(cfg)
        rec = [json.loads(ln) for ln in (tmp_path / str(tpp) / "run" / "metrics.jsonl").read_text().splitlines()]
        logged.append(next(r for r in rec if "grad_norm" in r))
    one, many = logged
    # The gradient of the whole micro-batch (its norm, before Adam's first step, which is close to a sign and
    # would blow float noise up) and the loss are those of one pass.
    assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert many["loss/train"] == pytest.approx(one["loss/train"], rel=1e-6)
    assert many["reward/accuracy"] == pytest.approx(one["reward/accuracy"], rel=1e-6)


def test_select_best_or_last(tmp_path, long_pairs, tiny_lm_dir, monkeypatch):
    from safetensors.torch import load_file

    train, _, _ = long_pairs
    calls = []

    def worse_each_time(*a, **kw):  # validation says step 1 was the best
        calls.append(1)
        return 1.0 / len(calls)

    monkeypatch.setattr(R, "val_score", worse_each_time)
    for sel in ("best", "last"):
        calls.clear()
        cfg = cfg_for(tmp_path / sel, model={"kind": "deep", "backbone": tiny_lm_dir, "max_len": 48},
                      data={"source": [str(train)], "max_items": 64}, loss={"kind": "bt"},
                      optim={"lr": 3e-2, "max_steps": 4, "warmup_steps": 0, "batch_size": 8},
                      log={"eval_every": 1, "save_every": 0})
        cfg.select = sel
        s = R.train(cfg)
        head = load_file(str(tmp_path / sel / "run" / "final" / "scalar_head.safetensors"))["weight"]
        last = torch.load(tmp_path / sel / "run" / "checkpoints" / "step-000004" / "trainer_state.pt",
                          weights_only=False)["model"]["head.weight"]
        assert torch.equal(head.flatten(), last.flatten()) == (sel == "last")
        assert s["select"] == sel and s["val_score"] == (1.0 if sel == "best" else 1.0 / 5)


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def test_new_flags_parse_and_bad_combinations_are_rejected(capsys):
    cfg = parse_config(RewardConfig, ["--model.kind", "deep", "--model.truncation", "right", "--select", "last",
                                      "--eval.file", "a.jsonl.gz,b.jsonl", "--model.tokens_per_pass", "8192",
                                      "--data.test_fraction", "0"])
    assert (cfg.model.truncation, cfg.select, cfg.eval.file, cfg.model.tokens_per_pass, cfg.data.test_fraction) == (
        "right", "last", ["a.jsonl.gz", "b.jsonl"], 8192, 0.0)
    with pytest.raises(ConfigError, match="select=last is for deep"):
        from_dict(RewardConfig, {"select": "last"})
    with pytest.raises(ConfigError, match="eval.model needs eval.file"):
        from_dict(RewardConfig, {"eval": {"model": "runs/reward/final"}})
    with pytest.raises(SystemExit):
        parse_config(RewardConfig, ["--model.truncation", "middle"])
    assert "model.truncation" in capsys.readouterr().err
