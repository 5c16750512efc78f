"""Probe: how much peak RSS does transformers' modeling code cost an RL run? (not used by rlhfkit)

    rlhfkit bench trl-peer --sides ours --trainers grpo --steps 2 --workdir WORKDIR   # builds the artifacts
    python bench/lite_policy_probe.py WORKDIR --algo grpo --micro-batch 64 [--hf]

Runs `rlhfkit.rl.<algo>.train` on the trl-peer workload (WORKDIR holds its artifacts), with the GPT-2
policy loaded into a bare module of our own that has HF's parameter names and config. Our decoder and
replay read only those, so `transformers.modeling_utils` is never imported. With --hf it uses the usual
HF class, for comparison. Nothing is saved at the end. The probe covers GRPO and, without a reference
model, nothing else. Prints every step's time and the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn


class _Conv1D(nn.Module):  # GPT-2's: y = x @ weight + bias, weight (in, out)
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.empty(n_in, n_out)), nn.Parameter(torch.empty(n_out))


class _Block(nn.Module):
    def __init__(self, d: int, inner: int, eps: float) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.c_attn, self.attn.c_proj = _Conv1D(d, 3 * d), _Conv1D(d, d)
        self.mlp.c_fc, self.mlp.c_proj = _Conv1D(d, inner), _Conv1D(inner, d)


class GPT2LMHeadModel(nn.Module):  # the name fastdecode.supported() looks for
    def __init__(self, cfg: types.SimpleNamespace) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.n_embd
        self.transformer = nn.Module()
        self.transformer.wte, self.transformer.wpe = nn.Embedding(cfg.vocab_size, d), nn.Embedding(cfg.n_positions, d)
        self.transformer.h = nn.ModuleList(_Block(d, cfg.n_inner or 4 * d, cfg.layer_norm_epsilon)
                                           for _ in range(cfg.n_layer))
        self.transformer.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in the checkpoint

    def save_pretrained(self, *args, **kwargs) -> None:  # the probe keeps nothing
        pass


def load_lite(path: str, *args, **kwargs) -> GPT2LMHeadModel:
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg.setdefault("n_inner", None)
    model = GPT2LMHeadModel(types.SimpleNamespace(**cfg))
    state = {(k if k.startswith(("transformer.", "lm_head")) else "transformer." + k): v
             for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise SystemExit(f"not a plain GPT-2 checkpoint: missing {missing}, unexpected {unexpected}")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", help="the trl-peer artifacts (tokenizer/, policy_init/, prompts.json)")
    ap.add_argument("--algo", default="grpo", choices=["grpo"], help="the trainer (GRPO: no reference model)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps (the first one warms up)")
    ap.add_argument("--micro-batch", type=int, default=16, help="completions per forward/backward micro-batch")
    ap.add_argument("--replay-mb", type=float, default=1024.0, help="rollout.replay_max_mb")
    ap.add_argument("--hf", action="store_true", help="load the policy with transformers' class instead")
    a = ap.parse_args()

    from rlhfkit.bench import trl_peer
    from rlhfkit.models import factory
    from rlhfkit.rl import common

    if not a.hf:
        factory.load_causal_lm = load_lite
    common.save_model = lambda *args, **kwargs: None
    train = __import__(f"rlhfkit.rl.{a.algo}", fromlist=["train"]).train
    cfg = trl_peer.workload_config(a.algo, Path(a.workdir), a.steps, Path(a.workdir) / "lite_probe_run", 0,
                                   a.micro_batch, a.replay_mb)
    times, last = [], [time.perf_counter()]

    def on_step(step: int, metrics: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train(cfg, on_step=on_step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'hf' if a.hf else 'lite'} {a.algo} micro-batch {a.micro_batch}: s/step {[round(t, 3) for t in times]}")
    print(f"median s/step after the first: {statistics.median(times[1:]):.3f}, peak RSS {peak:.0f} MB, "
          f"transformers.modeling_utils imported: {'transformers.modeling_utils' in sys.modules}")


if __name__ == "__main__":
    main()
