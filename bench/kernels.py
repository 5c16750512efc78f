"""Our CPU kernels (rlhfkit/accel/csrc/kernels.c) against what they replace, at the trl-peer shapes.

    python bench/kernels.py [--threads 2] [--repeats 15]

1. tanh-GELU forward and backward, ours vs torch's (F.gelu / aten gelu_backward), on a decode step's
   (64, 1024) and a GRPO micro-batch's (1504, 1024) up-projection outputs.
2. The same on a micro-batch's rows of a time-major record, a (16, 31, 1024) strided view: ours read in
   place, against copying the view to a contiguous tensor first (what the lean backward did before).
3. A rollout's decoding on a random GPT-2 of the benchmark's shape (4 layers, 256 dims, 4 heads, 2,048-token
   vocabulary; 64 rows, 16 prompt tokens, then 31 steps), three ways: each step one call of ours
   (GPT2Decoder._c_step), the per-op step with our bias epilogues (_step_blocks), and torch's ops (addmm,
   copy_ into the KV cache, GELU, residual add).
4. Plain sampling of 64 rows over the 2,048-token vocabulary with the statistics a rollout keeps (log Z,
   entropy): ours in one pass (native.sample_rows) against rollout.sample_next's torch ops.

Each figure is the median over `--repeats` rounds (the variants alternate within a round) after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def compare(variants: dict, repeats: int, n: int) -> dict[str, float]:
    """Median microseconds per call of each variant, alternating within each round."""
    for fn in variants.values():
        timed(fn, 3)
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            res[k].append(timed(fn, n))
    return {k: statistics.median(v) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=15, help="rounds per comparison; medians are printed")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rlhfkit.accel import activations as act
    from rlhfkit.accel import fastdecode
    from rlhfkit.accel.native import native_status

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; our kernels: {native_status()}")
    if not native_status().startswith("on"):
        raise SystemExit("our kernels are off here: nothing to compare")
    torch.manual_seed(0)
    print("\n| what | shape | ours (us) | torch's (us) | ratio |\n|---|---|---|---|---|")
    for shape in [(64, 1024), (1504, 1024)]:
        x, dy = torch.randn(shape) * 3, torch.randn(shape)
        fwd = {"ours": lambda x=x: act.gelu_tanh_forward(x), "torch": lambda x=x: F.gelu(x, approximate="tanh")}
        bwd = {"ours": lambda x=x, dy=dy: act.gelu_tanh_backward(dy, x),
               "torch": lambda x=x, dy=dy: torch.ops.aten.gelu_backward(dy, x, approximate="tanh")}
        for what, variants in (("forward", fwd), ("backward", bwd)):
            r = compare(variants, args.repeats, 50)
            print(f"| GELU {what} | {shape} | {r['ours']:.0f} | {r['torch']:.0f} | {r['torch'] / r['ours']:.1f}x |")

    rec = torch.randn(31, 64, 1024) * 3
    h = rec[:, 16:32].transpose(0, 1)  # a micro-batch's rows: (16, 31, 1024), not contiguous
    dg = torch.randn(h.shape)

    def in_place():
        act.gelu_tanh_forward(h)
        act.gelu_tanh_backward(dg, h)

    def copied():
        act.gelu_tanh_forward(h.contiguous())
        act.gelu_tanh_backward(dg, h.contiguous())

    r = compare({"in_place": in_place, "copied": copied}, args.repeats, 50)
    print(f"\nGELU forward + backward of a (16, 31, 1024) record view: read in place {r['in_place']:.0f} us, "
          f"copied first {r['copied']:.0f} us ({r['copied'] / r['in_place']:.2f}x)")

    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=2048, n_positions=256, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    ids, mask = torch.randint(5, 2048, (16, 16)), torch.ones(16, 16, dtype=torch.long)
    toks = torch.randint(5, 2048, (64,))
    real = fastdecode.native_ok

    def rollout(way: str) -> None:
        fastdecode.native_ok = real if way != "torch" else (lambda *t: False)
        try:
            dec = fastdecode.make_fast_decoder(model)
            with torch.no_grad():
                dec.start(ids, mask, 4, max_new=32)
                if way == "epilogues":
                    dec.cstep = None
                for _ in range(31):
                    dec.step(toks)
        finally:
            fastdecode.native_ok = real

    r = compare({w: lambda w=w: rollout(w) for w in ("one_call", "epilogues", "torch")}, args.repeats, 3)
    print(f"GPT-2 prefill + 31 decode steps, 64 rows: one call a step {r['one_call'] / 1e3:.1f} ms, "
          f"per op with our epilogues {r['epilogues'] / 1e3:.1f} ms, torch's ops {r['torch'] / 1e3:.1f} ms "
          f"({(r['epilogues'] - r['one_call']) / 31:.0f} and {(r['torch'] - r['one_call']) / 31:.0f} us per step "
          "saved)")

    from rlhfkit.accel.native import sample_rows
    from rlhfkit.rl import rollout as ro

    logits, u = torch.randn(64, 2048) * 3, torch.rand(64, 1)

    def torchs() -> None:
        ro.sample_rows = lambda *a: None
        try:
            ro.sample_next(logits, 1.0, u=u, stats=True)
        finally:
            ro.sample_rows = sample_rows

    r = compare({"ours": lambda: sample_rows(logits, 1.0, u), "torch": torchs}, args.repeats, 50)
    print(f"Sampling 64 rows of 2,048 logits with log Z and entropy: ours {r['ours']:.0f} us, "
          f"torch's ops {r['torch']:.0f} us ({r['torch'] / r['ours']:.1f}x)")


if __name__ == "__main__":
    main()
