"""Tokenizer: exact round trip on any text, BOS handling, chat template, save/load."""
from __future__ import annotations

import random

import pytest

from rlhfkit.data.tokenizer import CHAT_TEMPLATE, EOS, load_tokenizer, train_tokenizer


def test_round_trip_on_real_and_random_text(tiny_tokenizer, vader_texts):
    tok = tiny_tokenizer
    rng = random.Random(0)
    samples = vader_texts[-200:] + ["", " ", "  two  spaces\tand tab\n", "naïve café 😀 日本語 ∑",
                                    "\x00\x01 control"]
    alphabet = [chr(c) for c in range(32, 0x3000, 7)] + ["\n", "\t", " "]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s


def test_bos_prepended_and_special_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id == tok.bos_token_id == 0
    assert tok.pad_token_id == 1
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "hello"


def test_chat_template(tiny_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tiny_tokenizer.chat_template == CHAT_TEMPLATE
    assert tiny_tokenizer.apply_chat_template(msgs, tokenize=False) == \
        "<|user|>\nhi\n<|assistant|>\nhello<|endoftext|>\n"
    assert tiny_tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == \
        "<|user|>\nhi\n<|assistant|>\n"


def test_save_load_same_ids(tiny_tokenizer, tmp_path, vader_texts):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    for s in vader_texts[:50]:
        assert again(s)["input_ids"] == tiny_tokenizer(s)["input_ids"]
    assert again.padding_side == "left"


def test_trained_vocab_size_and_compression(vader_texts):
    tok = train_tokenizer(vader_texts[:2000], vocab_size=1000)
    assert len(tok) == 1000
    n_chars = sum(len(t) for t in vader_texts[2000:2500])
    n_toks = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in vader_texts[2000:2500])
    assert n_chars / n_toks > 2.5  # BPE merges really compress held-out English


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "nothing"))
