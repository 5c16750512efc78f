"""Prompts for the RL stages: files in every documented format, named sources cut to N tokens, chat."""
from __future__ import annotations

import json

import pytest

from rlhfkit.config import PromptDataConfig
from rlhfkit.errors import DataError
from rlhfkit.rl.common import load_prompts


def test_prompt_files(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    (tmp_path / "p.txt").write_text("The movie\n\n I think \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "The movie", "id": 1}) + "\n" +
                                      json.dumps({"prompt": "I think"}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(["The movie", "I think"]))
    for name in ("p.txt", "p.jsonl", "p.json"):
        ps = load_prompts(PromptDataConfig(source=str(tmp_path / name)), tok)
        assert ps.texts == ["The movie", "I think"]
        assert ps.ids[0] == tok("The movie")["input_ids"]  # BOS + text, as the policy was trained
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: missing field 'prompt'"):
        load_prompts(PromptDataConfig(source=str(tmp_path / "bad.jsonl")), tok)
    long = load_prompts(PromptDataConfig(source=str(tmp_path / "p.txt"), max_prompt_tokens=2), tok)
    assert long.ids[0] == tok("The movie")["input_ids"][-2:]  # long prompts keep their end


def test_named_source_cut_to_n_tokens_and_chat(tiny_tokenizer):
    tok = tiny_tokenizer
    ps = load_prompts(PromptDataConfig(source="vader:movie", prompt_tokens=5, max_prompts=20), tok)
    assert len(ps.texts) == 20
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 5 for t in ps.texts)
    chat = load_prompts(PromptDataConfig(source="vader:movie", prompt_tokens=5, max_prompts=2, template="chat"), tok)
    rendered = tok.decode(chat.ids[0])
    assert "<|user|>" in rendered and rendered.rstrip().endswith("<|assistant|>")
