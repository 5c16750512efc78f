"""Best-of-n sampling: draw n completions per prompt and keep the one a reward scores highest.

A strong, training-free baseline for every RL stage (and rejection sampling for data): its expected reward
grows with n, at a KL from the policy of at most log n - (n - 1)/n nats.

    rlhfkit bestofn runs/sft/final --reward runs/reward/final -n 8 "The movie" "I think"
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.rl.rollout import SamplingParams, generate


def best_of_n(model: torch.nn.Module, tok: Any, prompts: Sequence[str], reward_fn: Any, n: int,
              params: SamplingParams, backend: str = "auto", chat: bool = False) -> list[dict[str, Any]]:
    """For each prompt: the best completion, its reward, and all n completions with their rewards."""
    if chat:
        ids = []
        for p in prompts:
            x = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            ids.append(list(x["input_ids"] if hasattr(x, "keys") else x))
    else:
        ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    ro = generate(model, tok, ids, params, n=n, backend=backend, prompts=list(prompts))
    rewards = reward_fn(ro.prompts, ro.completions).view(len(prompts), n)
    out = []
    for i, p in enumerate(prompts):
        j = int(rewards[i].argmax())
        out.append({"prompt": p, "completion": ro.completions[i * n + j], "reward": float(rewards[i, j]),
                    "completions": ro.completions[i * n:(i + 1) * n], "rewards": rewards[i].tolist()})
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit bestofn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="policy directory in HF format (e.g. runs/sft/final)")
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", default="", help="a .txt (one prompt per line) or .jsonl file with 'prompt'")
    p.add_argument("--reward", default="rule:vowels", help="reward spec: rule:<name>, rule:<module>:<fn>, or a "
                                                           "reward model directory")
    p.add_argument("-n", type=int, default=8, help="completions sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="", help="write one JSON line per prompt here (default: print a summary)")
    a = p.parse_args(argv)

    from rlhfkit.config import PromptDataConfig, TokenizerConfig
    from rlhfkit.errors import ConfigError
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm
    from rlhfkit.models.reward import load_reward
    from rlhfkit.rl.common import _prompt_texts
    from rlhfkit.utils.runtime import quiet_hf

    quiet_hf()
    if a.n < 1:
        raise ConfigError(f"-n {a.n}: need at least one sample per prompt")
    tok = get_tokenizer(TokenizerConfig(), a.model)
    prompts = list(a.prompts)
    if a.prompts_file:
        prompts += _prompt_texts(PromptDataConfig(source=a.prompts_file), tok)
    if not prompts:
        raise ConfigError("give prompts as arguments or with --prompts-file")
    torch.manual_seed(a.seed)
    model = load_causal_lm(a.model)
    params = SamplingParams(a.max_new_tokens, a.temperature, a.top_p, a.top_k)
    results = best_of_n(model, tok, prompts, load_reward(a.reward), a.n, params, chat=a.chat)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    mean_all = sum(sum(r["rewards"]) / len(r["rewards"]) for r in results) / len(results)
    mean_best = sum(r["reward"] for r in results) / len(results)
    for r in results[:10]:
        print(f"{r['reward']:.4g}  {r['prompt']!r} -> {r['completion']!r}")
    print(f"best-of-{a.n}: mean reward {mean_best:.4g} (mean of all samples {mean_all:.4g}) over {len(results)} prompts"
          + (f"; wrote {a.out}" if a.out else ""))
    return 0
