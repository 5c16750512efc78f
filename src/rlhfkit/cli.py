"""`rlhfkit <stage> [flags]`: one subcommand per pipeline stage.

Stages are imported lazily, so `rlhfkit --help` and config errors come back without loading torch.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from rlhfkit import __version__
from rlhfkit.errors import RLHFKitError

# Training stages: name -> (one-line help, config class in rlhfkit.config, "module:function(cfg)").
STAGES: dict[str, tuple[str, str, str]] = {
    "pretrain": ("pretrain a causal LM (tiny Llama from scratch by default) on a text corpus",
                 "PretrainConfig", "rlhfkit.train.pretrain:train"),
    "sft": ("supervised fine-tuning on prompt/response pairs (loss on the response only)",
            "SFTConfig", "rlhfkit.train.sft:train"),
    "reward": ("train a reward model (linear or deep) on ratings, pairs, rankings or edits",
               "RewardConfig", "rlhfkit.train.reward:train"),
    "ppo": ("PPO: actor + critic, per-token KL to the reference, GAE, clipped losses",
            "PPOConfig", "rlhfkit.rl.ppo:train"),
    "grpo": ("GRPO: group-relative advantages over several samples per prompt, clipped surrogate",
             "GRPOConfig", "rlhfkit.rl.grpo:train"),
    "rloo": ("RLOO: REINFORCE with a leave-one-out baseline per prompt, KL in the reward",
             "RLOOConfig", "rlhfkit.rl.rloo:train"),
    "reinforce": ("REINFORCE with a batch-mean baseline, KL in the reward",
                  "REINFORCEConfig", "rlhfkit.rl.reinforce:train"),
    "dpo": ("DPO / IPO on offline preference pairs (the feedback export)",
            "DPOConfig", "rlhfkit.train.dpo:train"),
    "eval": ("evaluate a policy vs its reference: proxy/gold reward, judge, KL, win rate, diversity",
             "EvalConfig", "rlhfkit.eval.evaluate:evaluate"),
    "loop": ("rounds of generate -> feedback (simulated or people in the web app) -> reward model -> RL -> eval",
             "LoopConfig", "rlhfkit.loop:run"),
    "demo": (("the whole pipeline offline in minutes: pretrain -> reward models on human ratings -> PPO -> "
              "eval -> report"), "DemoConfig", "rlhfkit.demo:run"),
    "serve": ("serve a model: OpenAI-compatible API with streaming, and a chat page that collects feedback",
              "ServeConfig", "rlhfkit.serve.server:serve"),
}

# Commands with their own sub-commands or arguments: name -> (one-line help, "module:main(argv)").
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("list, fetch and inspect the offline data sources", "rlhfkit.data.cli:main"),
    "tokenizer": ("train a byte-level BPE tokenizer or inspect one", "rlhfkit.data.tokenizer:main"),
    "sample": ("generate text from a checkpoint (quick look at a model)", "rlhfkit.models.sample:main"),
    "bestofn": ("best-of-n sampling: n completions per prompt, keep the one a reward scores highest",
                "rlhfkit.rl.bestofn:main"),
    "bench": ("benchmarks: `rlhfkit bench trl-peer` runs our GRPO/RLOO/PPO beside TRL's on one workload",
              "rlhfkit.bench.cli:main"),
    "feedback": ("human feedback: annotation web app, import, simulated labelers, export, agreement",
                 "rlhfkit.feedback.cli:main"),
    "report": ("write an HTML report with plots for a run directory", "rlhfkit.eval.report:main"),
}


def _load(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _usage() -> str:
    width = max(len(n) for n in [*STAGES, *COMMANDS]) + 2
    lines = [f"rlhfkit {__version__}: RLHF for language models, from pretraining to serving.", "",
             "usage: rlhfkit <command> [--config FILE.yaml] [--section.field VALUE ...]", "",
             "training stages:"]
    lines += [f"  {n:<{width}}{h}" for n, (h, _, _) in STAGES.items()]
    lines += ["", "other commands:"]
    lines += [f"  {n:<{width}}{h}" for n, (h, _) in COMMANDS.items()]
    lines += ["", "`rlhfkit <command> --help` explains every flag of a command."]
    return "\n".join(lines)


def run_stage(name: str, argv: list[str]) -> int:
    from rlhfkit import config

    _, cls_name, target = STAGES[name]
    cls = getattr(config, cls_name)
    cfg = config.parse_config(cls, argv, prog=f"rlhfkit {name}")
    _load(target)(cfg)
    _end_processes()
    return 0


def _end_processes() -> None:
    """After a stage ran under torchrun / accelerate launch: wait for every rank, tear the process group
    down and end the process at once (os._exit, after flushing). Left to interpreter shutdown, gloo's worker
    threads may still be releasing the buffers of the last collectives while Python finalises, and the
    process aborts ('terminate called without an active exception') after all the work is saved. Every
    file of the stage is closed by then; a failed stage raises before this and exits normally."""
    td = sys.modules.get("torch.distributed")
    if td is None or not td.is_available() or not td.is_initialized():
        return
    import os

    td.barrier()
    td.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if name in STAGES:
            return run_stage(name, rest)
        if name in COMMANDS:
            return int(_load(COMMANDS[name][1])(rest) or 0)
    except RLHFKitError as e:
        print(f"rlhfkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nrlhfkit {name}: interrupted", file=sys.stderr)
        return 130
    import difflib

    close = difflib.get_close_matches(name, [*STAGES, *COMMANDS], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    print(f"rlhfkit: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
