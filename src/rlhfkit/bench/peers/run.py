"""`rlhfkit bench peers`: our GRPO and RLOO beside TRL's on a real model, in fresh interleaved processes.

The workload (workload.py) is defined once and read by both sides: SmolLM2-135M-Instruct by default, 8
VADER movie-review openings x 4 completions x 64 new tokens per step, temperature 1, AdamW lr 1e-5
constant, gradient clipping at 1.0, one optimizer step per rollout over the whole batch, float32, the KL
weight of TRL's defaults (GRPO 0, RLOO 0.05), one warm-up step then --steps timed steps, the same reward
function object on both sides (a lexicon rule, or a MiniLM encoder with a fixed head).

TRL runs in a virtualenv of its own, built on first use from the pinned requirements-trl.txt beside this
file; our side runs `rlhfkit.rl.<trainer>.train` in a fresh process that never imports TRL, so peak RSS is
comparable. Runs are interleaved (with --repeats > 1 the order of the two sides alternates), so slow
phases of a shared machine hit both sides alike.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlhfkit.bench.peers import workload as W

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-trl.txt"
SIDES = ("trl", "ours")


# ---------------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------------
def build_workloads(model: str, trainers: list[str], loras: list[int], reward: str, steps: int, threads: int,
                    workdir: Path, minilm: str = "") -> list[tuple[W.Workload, Path]]:
    """One workload file per (trainer, LoRA rank), all sharing one prompts file: enough VADER movie
    openings for every step of a run, so no prompt repeats within a run."""
    from rlhfkit.data.sources import vader_items

    base = W.Workload(model=model, trainer=trainers[0], reward=reward, steps=steps, threads=threads, minilm=minilm)
    n = base.prompts_per_step * (base.warmup_steps + steps)
    texts = W.prompt_texts([it.text for it in vader_items(["movie"])], n, base.prompt_words)
    if len(texts) < n:
        from rlhfkit.errors import DataError

        raise DataError(f"VADER movie snippets give {len(texts)} prompts, {n} needed: use fewer --steps")
    prompts = workdir / "prompts.jsonl"
    W.write_prompts(texts, prompts)
    out = []
    for trainer in trainers:
        for r in loras:
            w = W.Workload(**{**base.__dict__, "trainer": trainer, "lora_r": r, "kl_coef": W.KL_COEF[trainer],
                              "prompts_file": str(prompts)})
            path = workdir / f"workload_{trainer}_lora{r}.json"
            w.save(path)
            out.append((w, path))
    return out


def our_config(w: W.Workload, run_dir: Path) -> Any:
    """Our trainer's config for the workload."""
    from rlhfkit import config as C

    cfg = {"grpo": C.GRPOConfig, "rloo": C.RLOOConfig}[w.trainer]()
    cfg.model.name_or_path, cfg.model.dtype = w.model, "float32"
    cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_targets = w.lora_r, w.lora_alpha, "all-linear"
    cfg.data.source, cfg.data.template, cfg.data.max_prompt_tokens = w.prompts_file, "chat", 512
    r = cfg.rollout
    r.prompts_per_step, r.samples_per_prompt = w.prompts_per_step, w.completions_per_prompt
    r.max_new_tokens, r.temperature, r.top_p, r.top_k = w.max_new_tokens, w.temperature, 1.0, 0
    cfg.reward.spec = f"rule:{W.__name__}:{W.REWARD_FNS[w.reward]}"
    cfg.kl.coef = w.kl_coef
    if w.trainer == "rloo":
        cfg.kl.estimator = "k1"
    o = cfg.optim
    o.lr, o.schedule, o.warmup_steps, o.weight_decay = w.lr, "constant", 0, 0.0
    o.beta1, o.beta2, o.eps, o.grad_clip = 0.9, 0.999, 1e-8, w.grad_clip
    o.batch_size, o.grad_accum, o.max_steps = w.samples_per_step, 1, w.warmup_steps + w.steps
    cfg.log.run_dir = str(run_dir)
    cfg.log.log_every, cfg.log.eval_every, cfg.log.save_every = 1, 0, 0
    cfg.log.tensorboard = cfg.log.progress = False
    cfg.run.seed, cfg.run.threads, cfg.run.resume = w.seed, w.threads, False
    C.check_config(cfg)
    return cfg


def run_ours_worker(workload_json: str, out_json: str) -> None:
    """Our side, in this (fresh) process: train, recording the time, peak RSS and phases of each step."""
    import resource

    w = W.Workload.load(workload_json)
    import torch

    import rlhfkit

    train = importlib.import_module(f"rlhfkit.rl.{w.trainer}").train
    cfg = our_config(w, Path(out_json).with_suffix("").with_name(Path(out_json).stem + "_run"))
    marks: list[dict] = []

    def on_step(step: int, m: dict) -> None:
        marks.append({"t": time.perf_counter(), "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rollout": m["perf/gen_s"], "reward": W.REWARD_SECONDS[0], "ref": m["perf/ref_s"],
                      "tokens": m["rollout/tokens"],
                      "reward_mean": m["rollout/reward_mean"]})

    t0 = time.perf_counter()
    train(cfg, on_step=on_step)
    res = {"side": "ours", "train_call_s": time.perf_counter() - t0, "marks": marks, "start": t0,
           "versions": {"rlhfkit": rlhfkit.__version__, "torch": torch.__version__,
                        "transformers": importlib.import_module("transformers").__version__,
                        "python": platform.python_version()},
           "torch_threads": torch.get_num_threads(),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out_json).write_text(json.dumps(res))


def step_rows(raw: dict, w: W.Workload) -> list[dict]:
    """Per timed step: seconds, generation / reward / scoring / update seconds, generated tokens (from a
    worker's marks). Ours: the rollout time minus the reward's is generation, scoring is the reference's
    forward. TRL: generation is the time in generate(), scoring the no-gradient log-prob forwards (the
    reference's, and the old policy's where TRL runs one). The update is the rest of the step."""
    marks = raw["marks"]
    if len(marks) != w.warmup_steps + w.steps:
        raise RuntimeError(f"{raw['side']}: expected {w.warmup_steps + w.steps} steps, saw {len(marks)}")
    rows, prev = [], None
    for i, m in enumerate(marks):
        t_prev = prev["t"] if prev else raw["start"]
        dt, reward = m["t"] - t_prev, m["reward"] - (prev["reward"] if prev else 0.0)
        if raw["side"] == "ours":
            gen, score, tokens = m["rollout"] - reward, m.get("ref", 0.0), m["tokens"]
        else:
            gen = m["gen"] - (prev["gen"] if prev else 0.0)
            score = m.get("score", 0.0) - ((prev or {}).get("score", 0.0))
            logs = m.get("logs") or {}
            tokens = logs.get("completions/mean_length", float("nan")) * w.samples_per_step
        if i >= w.warmup_steps:
            rows.append({"s": dt, "gen_s": gen, "reward_s": reward, "score_s": score,
                         "other_s": dt - gen - reward - score, "tokens": tokens, "peak_rss_mb": m["peak"]})
        prev = m
    return rows


def summarize_run(raw: dict, w: W.Workload, model_info: dict, peak_flops: float) -> dict:
    """One result line: medians over the timed steps."""
    from rlhfkit.utils.runtime import model_flops_per_token

    rows = step_rows(raw, w)
    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    s, other = med("s"), med("other_s")
    tokens = statistics.median(r["tokens"] for r in rows)
    # Training FLOPs of the policy over the step's sequences (prompt + completion), charged to the update
    # (the step less generation, reward and the no-gradient scoring forwards: loss, forward, backward,
    # optimizer). Model FLOPs, as MFU counts them: work a side skips (our replay of the sampling forward,
    # each prompt run once per group) still counts, so the figure compares the two sides' update speed.
    seq = model_info["prompt_tokens_mean"] + tokens / w.samples_per_step
    fpt = model_flops_per_token(model_info["params"], model_info["layers"], model_info["d_model"], int(seq),
                                frozen=model_info["params"] if w.lora_r else 0)
    update_flops = fpt * seq * w.samples_per_step / other if other > 0 else float("nan")
    return {"side": raw["side"], "trainer": w.trainer, "lora_r": w.lora_r, "reward": w.reward, "status": "ok",
            "steps_timed": w.steps, "samples_per_step": w.samples_per_step,
            "s_per_step_median": round(s, 3), "s_per_step_min": round(min(r["s"] for r in rows), 3),
            "s_per_step_max": round(max(r["s"] for r in rows), 3),
            "samples_per_s": round(w.samples_per_step / s, 3), "gen_tokens_per_step": round(tokens, 1),
            "gen_tokens_per_s": round(tokens / s, 1), "gen_s_median": round(med("gen_s"), 3),
            "reward_s_median": round(med("reward_s"), 3), "score_s_median": round(med("score_s"), 3),
            "other_s_median": round(other, 3),
            "update_flops_per_s": round(update_flops), "sgemm_peak_flops_per_s": round(peak_flops),
            "update_peak_frac": round(update_flops / peak_flops, 3) if peak_flops else None,
            "peak_rss_mb": round(raw["peak_rss_mb"], 1), "torch_threads": raw["torch_threads"],
            "versions": raw["versions"], "step_times_s": [round(r["s"], 3) for r in rows]}


# ---------------------------------------------------------------------------------------------------
# TRL's virtualenv
# ---------------------------------------------------------------------------------------------------
def requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]


def default_venv() -> Path:
    return Path(tempfile.gettempdir()) / f"rlhfkit-peers-trl-{requirements_hash()}"


def ensure_trl_venv(venv: Path) -> tuple[str, float]:
    """TRL's interpreter: the virtualenv at `venv`, built from requirements-trl.txt unless its stamp says it
    already was. Returns (python, seconds spent building; 0 if it was there)."""
    from rlhfkit.errors import ConfigError

    py, stamp = venv / "bin" / "python", venv / "rlhfkit-peers.stamp"
    if py.exists() and stamp.exists() and stamp.read_text() == requirements_hash():
        return str(py), 0.0
    print(f"building TRL's virtualenv in {venv} from {REQUIREMENTS.name} (first run only; minutes) ...", flush=True)
    t = time.perf_counter()
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(py), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]]
    for cmd in steps:
        if subprocess.run(cmd, check=False).returncode:
            raise ConfigError(f"building TRL's virtualenv failed at: {' '.join(cmd)}")
    stamp.write_text(requirements_hash())
    return str(py), time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------
def worker_env(w: W.Workload) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(HERE.parents[2]))
    if w.minilm:
        env[W.MINILM_ENV] = w.minilm
    if w.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(w.threads)
    return env


def run_side(side: str, w: W.Workload, wl: Path, workdir: Path, tag: str, trl_python: str = "") -> dict:
    """One run in a fresh process; its raw record, or a failure record with the log's tail."""
    out, log = workdir / f"{side}_{tag}.json", workdir / f"{side}_{tag}.log"
    out.unlink(missing_ok=True)
    if side == "ours":
        cmd = [sys.executable, "-m", "rlhfkit.bench.peers.run", "--worker", str(wl), "--worker-out", str(out)]
    else:
        cmd = [trl_python, str(HERE / "trl_worker.py"), str(wl), str(out)]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=worker_env(w), check=False).returncode
    # The run's own output (our trainer saves the final policy: 540 MB for SmolLM2) is not needed here.
    shutil.rmtree(workdir / f"{side}_{tag}_run", ignore_errors=True)
    if rc == 0 and out.exists():
        return json.loads(out.read_text())
    return {"side": side, "status": "failed", "error": f"worker exited {rc}", "log": str(log),
            "log_tail": log.read_text(errors="replace")[-3000:]}


def model_info(path: str, prompts_file: str) -> dict:
    """Parameters and shape of the policy (built on the meta device: no weights read) and the mean
    length of the chat-templated prompts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    tok = AutoTokenizer.from_pretrained(path)
    lens = []
    for t in W.read_prompts(prompts_file):
        x = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        lens.append(len(x["input_ids"] if hasattr(x, "keys") else x))
    return {"params": sum(p.numel() for p in m.parameters()), "layers": cfg.num_hidden_layers,
            "d_model": cfg.hidden_size, "model_type": cfg.model_type, "prompt_tokens_mean": statistics.mean(lens)}


def measured_peak(threads: int) -> float:
    """The fp32 sgemm peak of this CPU at the workers' thread count (measured once, cached)."""
    import torch

    from rlhfkit.utils.runtime import cpu_peak_flops

    if threads:
        torch.set_num_threads(threads)
    return cpu_peak_flops()


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    """Markdown: per (trainer, LoRA, side), medians over repeats; then ours / TRL with each side's spread."""
    ok = [r for r in rows if r.get("status") == "ok"]
    keys = sorted({(r["trainer"], r["lora_r"]) for r in ok}, key=lambda k: (W.TRAINERS.index(k[0]), k[1]))
    out = [("| trainer | LoRA | side | runs | median s/step | samples/s | gen tok/s | generation s | reward s "
            "| scoring s | update s | peak RSS MB | update GFLOP/s (of sgemm peak) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for trainer, lora in keys:
        got = {}
        for side in SIDES:
            rs = [r for r in ok if (r["trainer"], r["lora_r"], r["side"]) == (trainer, lora, side)]
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in (
                "s_per_step_median", "samples_per_s", "gen_tokens_per_s", "gen_s_median", "reward_s_median",
                "score_s_median", "other_s_median", "peak_rss_mb", "update_flops_per_s", "update_peak_frac")
                if all(k in r for r in rs)}
            s = med["s_per_step_median"]
            # Spread: across runs where there are several, else across the steps of the one run.
            lo, hi = ((min(r["s_per_step_median"] for r in rs), max(r["s_per_step_median"] for r in rs))
                      if len(rs) > 1 else (rs[0]["s_per_step_min"], rs[0]["s_per_step_max"]))
            got[side] = {"sps": med["samples_per_s"], "rss": med["peak_rss_mb"], "spread": (hi - lo) / s}
            out.append(f"| {trainer} | {lora or 'full'} | {'TRL' if side == 'trl' else 'rlhfkit'} | {len(rs)} | "
                       f"{s:.2f} | {med['samples_per_s']:.2f} | {med['gen_tokens_per_s']:.0f} | "
                       f"{med['gen_s_median']:.2f} | {med['reward_s_median']:.3f} | "
                       f"{med.get('score_s_median', float('nan')):.2f} | {med['other_s_median']:.2f} | "
                       f"{med['peak_rss_mb']:.0f} | {med['update_flops_per_s'] / 1e9:.1f} "
                       f"({med['update_peak_frac']:.0%}) |")
        if len(got) == 2:
            t, o = got["trl"], got["ours"]
            ratios.append(f"| {trainer} | {lora or 'full'} | {o['sps'] / t['sps']:.2f}x | {o['rss'] / t['rss']:.2f}x | "
                          f"{t['spread']:.0%} | {o['spread']:.0%} |")
    if ratios:
        out += ["", ("| trainer | LoRA | samples/s, rlhfkit / TRL | peak RSS, rlhfkit / TRL | TRL s/step spread "
                     "| rlhfkit s/step spread |"), "|---|---|---|---|---|---|", *ratios]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        out += ["", *(f"- {r.get('side')} {r.get('trainer', '')} LoRA {r.get('lora_r', '')}: {r.get('error')} "
                      f"(log: {r.get('log')})" for r in failed)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
def comma_list(text: str, allowed: tuple, what: str) -> list:
    from rlhfkit.errors import ConfigError

    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or any(x not in allowed for x in items):
        raise ConfigError(f"--{what}: {text!r}; choose from {', '.join(map(str, allowed))} (comma list)")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhfkit bench peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="the policy: smollm2 (SmolLM2-135M-Instruct, converted "
                                                       "once from its packaged GGUF) or a local HF directory")
    ap.add_argument("--trainers", default="grpo,rloo", help="comma list from grpo, rloo")
    ap.add_argument("--lora", default="0,16", help="comma list of LoRA ranks: 0 = full fine-tuning, 16 = LoRA r 16 "
                                                   "(alpha 32, every linear layer)")
    ap.add_argument("--reward", default="rule", choices=W.REWARDS,
                    help="rule: sentiment words in the completion; minilm: a MiniLM encoder with a fixed head")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run, after 1 warm-up step")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of every (trainer, LoRA, side); the "
                                                           "order of the sides alternates between repeats")
    ap.add_argument("--sides", default="trl,ours", help="comma list from trl, ours")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (both sides); 0 = torch's default")
    ap.add_argument("--venv", default="", help="TRL's virtualenv, built there on first use (default: a directory "
                                               "in the system temp dir named after the requirements' hash)")
    ap.add_argument("--workdir", default="", help="workload files, logs and raw records (default: a temp dir)")
    ap.add_argument("--out", default="results-peers.jsonl", help="JSON lines, one per run (both sides)")
    ap.add_argument("--summarize", metavar="JSONL", default="", help="print the table of an existing results file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        run_ours_worker(a.worker, a.worker_out)
        return 0
    if a.summarize:
        print(table([json.loads(x) for x in Path(a.summarize).read_text().splitlines() if x.strip()]))
        return 0
    from rlhfkit.errors import ConfigError

    trainers = comma_list(a.trainers, W.TRAINERS, "trainers")
    sides = comma_list(a.sides, SIDES, "sides")
    try:
        loras = [int(x) for x in a.lora.split(",") if x.strip()]
    except ValueError:
        loras = []
    if not loras or min(loras) < 0:
        raise ConfigError(f"--lora {a.lora!r}: a comma list of LoRA ranks >= 0 (0 = full fine-tuning)")
    if a.steps < 1 or a.repeats < 1:
        raise ConfigError("--steps and --repeats must be at least 1")

    from rlhfkit.models.zoo import resolve_model

    model = resolve_model(a.model)
    if not (Path(model) / "config.json").is_file():
        raise ConfigError(f"--model {a.model!r}: not a named model (smollm2) and no config.json in that directory")
    minilm = resolve_model("minilm") if a.reward == "minilm" else ""
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="rlhfkit-peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    loads = build_workloads(model, trainers, loras, a.reward, a.steps, a.threads, workdir, minilm)
    info = model_info(model, loads[0][0].prompts_file)
    peak = measured_peak(a.threads)
    print(f"policy {a.model}: {info['model_type']}, {info['params'] / 1e6:.1f}M parameters; prompts "
          f"{info['prompt_tokens_mean']:.0f} tokens on average; measured fp32 sgemm peak {peak / 1e9:.1f} GFLOP/s; "
          f"workdir {workdir}", flush=True)

    trl_python = ""
    if "trl" in sides:
        venv = Path(a.venv) if a.venv else default_venv()
        trl_python, built_s = ensure_trl_venv(venv)
        print(f"TRL's virtualenv {f'built in {built_s:.0f} s' if built_s else 'ready'}: {venv}", flush=True)

    out = Path(a.out)
    out.write_text("")
    rows = []
    for rep in range(a.repeats):
        for w, wl in loads:
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                tag = f"{w.trainer}_lora{w.lora_r}_r{rep}"
                print(f"[{time.strftime('%H:%M:%S')}] {side} {w.trainer} LoRA {w.lora_r} (repeat {rep + 1})", flush=True)
                raw = run_side(side, w, wl, workdir, tag, trl_python)
                if raw.get("status") == "failed":
                    row = {**raw, "trainer": w.trainer, "lora_r": w.lora_r}
                    print(f"  failed: {raw['error']}; log {raw['log']}\n{raw['log_tail'][-800:]}", flush=True)
                else:
                    row = {**summarize_run(raw, w, info, peak), "repeat": rep,
                           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
                    print(f"  {row['s_per_step_median']:.2f} s/step, {row['samples_per_s']:.2f} samples/s, "
                          f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
                rows.append(row)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))
    print(f"\n{len(rows)} runs -> {out}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
