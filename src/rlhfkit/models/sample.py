"""`rlhfkit sample`: generate text from a checkpoint, to look at a model quickly."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model directory in HF format (e.g. runs/pretrain/final) or a .gguf file")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)

    import torch

    from rlhfkit.config import TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm
    from rlhfkit.utils.runtime import quiet_hf

    quiet_hf()
    torch.manual_seed(a.seed)
    tok = get_tokenizer(TokenizerConfig(), a.model)
    model = load_causal_lm(a.model).eval()
    for prompt in a.prompts:
        text = (tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=False) if a.chat else prompt)
        ids = tok(text, return_tensors="pt", add_special_tokens=not a.chat)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=a.temperature > 0,
                                 temperature=a.temperature or None, top_k=a.top_k or None,
                                 max_new_tokens=a.max_new_tokens, num_return_sequences=a.n,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in out:
            print(f"{prompt!r} -> {tok.decode(row[ids.size(1):], skip_special_tokens=True)!r}")
    return 0
