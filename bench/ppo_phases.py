"""Where our PPO step's time goes, phase by phase, on `rlhfkit bench trl-peer`'s PPO workload.

    python bench/ppo_phases.py [--steps 14] [--skip 3] [--micro-batch 32] [--pool-mb 256] [--ref-cache-mb 64]

Runs `rlhfkit.rl.ppo.train` on the bench's own config (`workload_config`, the artifacts in --workdir,
built by `rlhfkit bench trl-peer` first) with timers around its phases: the rollout, the reference's
log-probs, the critic's forward (`completion_values`) and backward, the policy's replay and backward, and
gradient clipping. It prints each phase's mean ms per step over the steps after --skip, the CPU
allocator's counters (new mappings after warm-up are misses past the pool) and the peak RSS. No profiler:
the phases add up to the step time (the rest is AdamW, the advantages and logging). --pool-mb sets our
CPU allocator's pool cap (models.cpu_alloc.POOL_CAP) and --ref-cache-mb the reference's prompt cache
(kl.ref_cache_mb), to compare settings in fresh processes.
"""
from __future__ import annotations

import argparse
import collections
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from rlhfkit.bench.trl_peer import add_script_args, script_config

    add_script_args(ap, 14, "steps left out of the means (warm-up)")
    ap.add_argument("--pool-mb", type=int, default=0, help="our CPU allocator's pool cap; 0 = its default")
    ap.add_argument("--ref-cache-mb", type=float, default=-1, help="kl.ref_cache_mb; -1 = the config's default")
    args = ap.parse_args()
    cfg = script_config(ap, args, "ppo", "ppo_phases")

    from rlhfkit.accel import cpu_alloc
    from rlhfkit.rl import driver, ppo

    if args.pool_mb:
        cpu_alloc.POOL_CAP = args.pool_mb << 20
    if args.ref_cache_mb >= 0:
        cfg.kl.ref_cache_mb = args.ref_cache_mb

    ms: dict[str, float] = collections.defaultdict(float)
    state = {"on": False, "steps": 0, "total": 0.0, "gen": 0.0, "misses": 0}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if state["on"]:
                ms[name] += (time.perf_counter() - t) * 1e3
            return out
        return wrapper

    for name, label in (("ref_logprobs", "reference forward"), ("values", "critic forward"),
                        ("logprobs", "policy replay")):
        setattr(driver.RLRun, name, timed(label, getattr(driver.RLRun, name)))
    backward = torch.Tensor.backward

    def timed_backward(loss: torch.Tensor, *a, **k):  # the value loss is vf_coef * vl: a MulBackward
        which = "critic backward" if "Mul" in type(loss.grad_fn).__name__ else "policy backward"
        return timed(which, backward)(loss, *a, **k)

    torch.Tensor.backward = timed_backward
    torch.nn.utils.clip_grad_norm_ = timed("gradient clipping", torch.nn.utils.clip_grad_norm_)

    def on_step(step: int, m: dict) -> None:
        if step == args.skip:
            state["on"], state["misses"] = True, cpu_alloc.stats()["misses"]
        elif step > args.skip:
            state["steps"] += 1
            state["total"] += m["perf/s_per_step"] * 1e3
            state["gen"] += m["perf/gen_s"] * 1e3

    ppo.train(cfg, on_step=on_step)
    n = state["steps"]
    rows = [("rollout", state["gen"])] + sorted(ms.items(), key=lambda kv: -kv[1])
    print(f"\nppo, micro-batch {cfg.optim.batch_size}, pool cap {cpu_alloc.POOL_CAP >> 20} MB, reference prompt "
          f"cache {cfg.kl.ref_cache_mb:g} MB: mean of steps {args.skip + 1}-{args.steps}")
    print("| phase | ms per step |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v / n:.1f} |")
    print(f"| rest (AdamW, advantages, logging) | {(state['total'] - sum(v for _, v in rows)) / n:.1f} |")
    print(f"| **step** | {state['total'] / n:.1f} |")
    s = cpu_alloc.stats()
    if s["enabled"]:
        print(f"CPU allocator: {(s['misses'] - state['misses']) / n:.1f} new mappings per step after warm-up, peak "
              f"live {s['peak_live'] >> 20} MB, peak mapped {s['peak_mapped'] >> 20} MB")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MB")


if __name__ == "__main__":
    main()
