"""Where an RL step's time goes, op by op: torch's profiler over a few steps of our side of trl-peer.

    python bench/profile_step.py grpo|rloo|ppo [--micro-batch 0] [--steps 8] [--skip 3] [--top 30]

Runs our trainer on the trl-peer workload (the artifacts in --workdir, built by `rlhfkit bench trl-peer`
first), profiles steps skip+1 .. steps, and prints the ops by self CPU time per step. The profiler costs
time of its own (a GRPO step takes about 0.44 s under it, 0.30 s without), mostly in the small ops, so
read the table for proportions, not for absolute step times. Then it prints the matmul throughput of the
shapes these steps use (torch.mm, hot in cache, no profiler): what the FLOP counts in docs/benchmarks.md
are divided by.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch


def matmul_rates(threads: int) -> None:
    rows_list, shapes = (64, 512, 2048), [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 2048)]
    print(f"\ntorch.mm GFLOP/s, {threads} threads (forward x @ w, input gradient dy @ w^T, weight gradient "
          "dy^T @ x)")
    print("| rows | in -> out | x @ w | dy @ w^T | dy^T @ x |")
    print("|---|---|---|---|---|")
    for rows in rows_list:
        for i, o in shapes:
            x, w, dy = torch.randn(rows, i), torch.randn(i, o), torch.randn(rows, o)
            rates = []
            for fn in (lambda x=x, w=w: x @ w, lambda dy=dy, w=w: dy @ w.t(), lambda dy=dy, x=x: dy.t() @ x):
                for _ in range(5):
                    fn()
                n = max(10, int(2e9 / (2 * rows * i * o)))
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                rates.append(2 * rows * i * o * n / (time.perf_counter() - t) / 1e9)
            print(f"| {rows} | {i} -> {o} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("algo", choices=("grpo", "rloo", "ppo"))
    from rlhfkit.bench.trl_peer import add_script_args, script_config

    add_script_args(ap, 8, "steps run before the profiler starts")
    ap.add_argument("--top", type=int, default=30, help="ops to print")
    args = ap.parse_args()
    cfg = script_config(ap, args, args.algo, f"profile_{args.algo}")
    mb = cfg.optim.batch_size
    train = importlib.import_module(f"rlhfkit.rl.{args.algo}").train
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    state = {"n": 0, "t": 0.0, "gen": 0.0}

    def on_step(step: int, m: dict) -> None:
        state["n"] += 1
        if state["n"] == args.skip:
            prof.__enter__()
            state["t"] = time.perf_counter()
        elif state["n"] > args.skip:
            state["gen"] += m["perf/gen_s"]
        if state["n"] == args.steps:
            prof.__exit__(None, None, None)
            state["t"] = time.perf_counter() - state["t"]

    train(cfg, on_step=on_step)
    n = args.steps - args.skip
    print(f"\n{args.algo}, micro-batch {mb}: {state['t'] / n:.3f} s per profiled step, of which generation "
          f"{state['gen'] / n:.3f} s")
    print("| op | self CPU ms per step | calls per step |")
    print("|---|---|---|")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"| {e.key[:60]} | {e.self_cpu_time_total / 1e3 / n:.2f} | {e.count / n:.0f} |")
    matmul_rates(torch.get_num_threads())


if __name__ == "__main__":
    main()
