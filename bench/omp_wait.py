"""OpenMP wait policy x machine load: one RL-sized train step and one 32-token decode, timed.

    python bench/omp_wait.py     # {default, PASSIVE, 1 thread} x {quiet, one core busy}

Each case is a fresh process (OMP_WAIT_POLICY is read once, when torch loads) running a tiny
Llama-architecture LM (4 layers x 256, 4.3M parameters) with torch's default threads: a forward+backward+
AdamW step on 64 sequences of 48 tokens, and the engine's KV-cache decode of 32 new tokens for 64 prompts
of 16 tokens; also the same with one thread (OMP_NUM_THREADS=1; `--run.threads 1` has the same effect). "One core busy" runs a pure-Python spin loop in another process for the duration, standing
in for any other job on the machine. Prints median seconds of 7 repeats after 2 warm-ups.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, random, statistics, sys, time, torch
from rlhfkit.config import ModelConfig, OptimConfig
from rlhfkit.data.tokenizer import train_tokenizer
from rlhfkit.models.factory import build_model, make_optimizer
from rlhfkit.rl.rollout import SamplingParams, generate

torch.manual_seed(0)
rng = random.Random(0)   # random words: enough distinct pieces for the default 4,096-token vocabulary
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
tok = train_tokenizer([" ".join(rng.choices(words, k=40)) for _ in range(2000)], vocab_size=4096)
model = build_model(ModelConfig(n_layer=4, n_head=4, d_model=256, max_seq_len=128), tok)
opt = make_optimizer(model, OptimConfig(lr=1e-5))
V = model.config.vocab_size
print('vocab', V, file=sys.stderr)
x = torch.randint(2, V, (64, 48))
prompts = torch.randint(2, V, (64, 16)).tolist()
params = SamplingParams(max_new_tokens=32, temperature=1.0)

def train():
    loss = model(input_ids=x, labels=x).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

def decode():
    with torch.no_grad():
        generate(model, tok, prompts, params, n=1)

out = {}
for name, fn in (("train_step_s", train), ("decode32_s", decode)):
    times = []
    for i in range(9):
        t = time.perf_counter(); fn(); dt = time.perf_counter() - t
        if i >= 2: times.append(dt)
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def case(policy: str | None, busy: bool, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    finally:
        if spinner:
            spinner.kill()
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    print("| threads | OMP_WAIT_POLICY | machine | train step (s) | decode 32 tokens (s) |")
    print("|---|---|---|---|---|")
    for busy in (False, True):
        for policy, threads in ((None, None), ("PASSIVE", None), (None, 1)):
            r = case(policy, busy, threads)
            print(f"| {threads or 'default'} | {policy or 'default (spin)'} | {'one core busy' if busy else 'quiet'} | "
                  f"{r['train_step_s']:.3f} | {r['decode32_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
