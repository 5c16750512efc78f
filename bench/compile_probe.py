"""Probe: does torch.compile speed up an RL-sized training step on this CPU? (not used by rlhfkit yet)

    python bench/compile_probe.py

The TRL peer workload's policy (a random GPT-2, 4 layers x 256, vocabulary 2,048): forward + log-softmax +
backward + fused AdamW on 64 sequences whose length varies from step to step (40-48 tokens, as completion
lengths do), eager vs `torch.compile(dynamic=True)`. Prints the first steps (compilation) and the median
of the next 10.
"""
from __future__ import annotations

import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

LENGTHS = [40, 44, 48, 46, 42, 48, 45, 47, 43, 41, 48, 44]


def main() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(m: torch.nn.Module, length: int) -> None:
        x = torch.randint(0, 2048, (64, length))
        logp = torch.log_softmax(m(input_ids=x).logits.float(), -1)
        logp.gather(-1, x.unsqueeze(-1)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name, m in (("eager", model), ("torch.compile(dynamic=True)", torch.compile(model, dynamic=True))):
        times = []
        for i, length in enumerate(LENGTHS):
            t = time.perf_counter()
            step(m, length)
            times.append(time.perf_counter() - t)
        print(f"{name}: first two steps {times[0]:.2f} s, {times[1]:.2f} s; "
              f"median of the next 10 {statistics.median(times[2:]):.3f} s", flush=True)


if __name__ == "__main__":
    main()
