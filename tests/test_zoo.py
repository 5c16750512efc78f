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
