"""`rlhfkit bench trl-peer`: our GRPO, RLOO and PPO beside TRL's, on TRL's CPU peer workload, in one run.

The workload is defined by a shared harness directory (default ../shared/bench/trl from the repository
root; --trl-dir): its `trl_cpu_bench.py` builds the tokenizer, prompts and initial GPT-2 policy
bit-identically (`build_artifacts()`, imported from there at run time, never copied), and its README lists
the SHA-256 of each artifact, which we check. TRL runs from that harness with its own virtualenvs (built by
its `setup_trl_venvs.sh` if they are missing); our side runs `rlhfkit.rl.<algo>.train` in a fresh Python
process per run that never imports TRL, so peak RSS is comparable. With --repeats > 1 the runs are
interleaved (grpo: TRL, ours; rloo: ...; then again with ours first), so slow phases of a shared machine
hit both sides alike.

Same workload semantics on both sides: GRPO/RLOO 16 prompts x 4 completions, PPO 64 prompts x 1, at most
32 new tokens, temperature 1, the vowel reward, AdamW lr 1e-5 constant (betas 0.9/0.999, no weight decay),
gradient clipping at 1.0, one optimizer step per rollout, float32, each trainer's KL default (GRPO 0,
RLOO 0.05, PPO 0.05 with a reference model), PPO's value model a random-init GPT-2 with seed 1 built
exactly as the harness builds TRL's. 1 warm-up step, then --steps timed steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ALGOS = ("grpo", "rloo", "ppo")
# Our micro-batch per trainer (--micro-batch 0): the largest of 16 and 32 whose peak RSS stays at about
# 0.5x TRL's or below, with the full replay record (docs/benchmarks.md). PPO has more room: TRL's PPO keeps a
# value model and a reference beside the policy. GRPO fits 32 with our caching CPU allocator only (glibc's
# heap fragments: 626-633 MB against 601-604), RLOO does not (636 MB).
MICRO_BATCH = {"grpo": 32, "rloo": 16, "ppo": 32}
MICRO_BATCH_SYSTEM_ALLOCATOR = {**MICRO_BATCH, "grpo": 16}
ARTIFACT_KEYS = ("corpus_sha256", "tokenizer_sha256", "prompts_sha256", "policy_init_sha256")


# ---------------------------------------------------------------------------------------------------
# Machine state (same definitions as the harness, so both sides are described alike)
# ---------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def steal_s() -> float:
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def load_avg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------
# Our worker: one trainer, one fresh process
# ---------------------------------------------------------------------------------------------------
def workload_config(algo: str, workdir: Path, steps: int, run_dir: Path, threads: int,
                    micro_batch: int = 16, replay_mb: float | None = None, cpu_allocator: str = "auto") -> Any:
    """Our config for the harness workload (steps = warm-up + timed)."""
    from rlhfkit import config as C

    cls = {"grpo": C.GRPOConfig, "rloo": C.RLOOConfig, "ppo": C.PPOConfig}[algo]
    cfg = cls()
    cfg.model.name_or_path = str(workdir / "policy_init")
    cfg.tokenizer.path = str(workdir / "tokenizer")
    cfg.data.source = str(workdir / "prompts.json")
    cfg.rollout.max_new_tokens, cfg.rollout.temperature = 32, 1.0
    cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt = (64, 1) if algo == "ppo" else (16, 4)
    cfg.reward.spec = "rule:vowels"
    cfg.kl.coef = 0.0 if algo == "grpo" else 0.05
    if algo != "grpo":
        cfg.kl.estimator = "k1"
    o = cfg.optim
    o.lr, o.schedule, o.warmup_steps, o.weight_decay = 1e-5, "constant", 0, 0.0
    o.beta1, o.beta2, o.eps, o.grad_clip = 0.9, 0.999, 1e-8, 1.0
    o.batch_size, o.max_steps = micro_batch, steps
    if replay_mb is not None:
        cfg.rollout.replay_max_mb = replay_mb
    if algo == "ppo":
        cfg.critic = str(workdir / "value_init")
    cfg.log.run_dir = str(run_dir)
    cfg.log.log_every, cfg.log.eval_every, cfg.log.save_every = 1, 0, 0
    cfg.log.tensorboard = cfg.log.progress = False
    cfg.run.seed, cfg.run.threads, cfg.run.resume = 0, threads, False
    cfg.run.cpu_allocator = cpu_allocator
    C.check_config(cfg)
    return cfg


def add_script_args(ap: Any, steps: int, skip_help: str) -> None:
    """The options of the scripts in bench/ that run our side of this workload in-process (profile_step.py,
    ppo_phases.py): --steps, --skip, --micro-batch, --threads, --workdir."""
    import tempfile

    ap.add_argument("--steps", type=int, default=steps, help="steps in all (warm-up included)")
    ap.add_argument("--skip", type=int, default=3, help=skip_help)
    ap.add_argument("--micro-batch", type=int, default=0, help="0 = the bench's default for the trainer")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rlhfkit_trl_peer"),
                    help="trl-peer's artifacts (its --workdir)")


def script_config(ap: Any, args: Any, algo: str, run_name: str) -> Any:
    """workload_config for such a script's parsed `args` (ap.error if --workdir has no artifacts yet)."""
    if args.steps <= args.skip:
        ap.error("--steps must be larger than --skip")
    wd = Path(args.workdir)
    if not (wd / "policy_init").is_dir():
        ap.error(f"{wd} has no trl-peer artifacts: run `rlhfkit bench trl-peer --sides ours --trainers "
                 f"{algo} --steps 1 --workdir {wd}` once first")
    return workload_config(algo, wd, args.steps, wd / run_name, args.threads, args.micro_batch or MICRO_BATCH[algo])


def run_worker(algo: str, steps: int, workdir: Path, threads: int, micro_batch: int,
               replay_mb: float | None = None, cpu_allocator: str = "auto") -> dict[str, Any]:
    rss_start = rss_mb()
    import torch

    import rlhfkit
    from rlhfkit.accel import cpu_alloc
    from rlhfkit.config import to_dict

    train = importlib.import_module(f"rlhfkit.rl.{algo}").train
    run_dir = workdir / f"ours_{algo}"
    cfg = workload_config(algo, workdir, steps + 1, run_dir, threads, micro_batch, replay_mb, cpu_allocator)
    marks: list[dict[str, float]] = []

    def on_step(step: int, m: dict) -> None:
        t = os.times()
        marks.append({"t": time.perf_counter(), "rss": rss_mb(), "peak": peak_rss_mb(), "cpu": t.user + t.system,
                      "steal": steal_s(), "reward": m["rollout/reward_mean"], "tokens": m["rollout/tokens"],
                      "samples": m["perf/samples_per_s"] * m["perf/s_per_step"], "gen_s": m["perf/gen_s"],
                      "ref_cache": m.get("perf/ref_cache_hit_frac")})

    t0 = time.perf_counter()
    train(cfg, on_step=on_step)
    t1 = time.perf_counter()
    if len(marks) != steps + 1:
        raise RuntimeError(f"expected {steps + 1} steps, saw {len(marks)}")
    timed = marks[1:]
    wall = timed[-1]["t"] - marks[0]["t"]
    step_times = [b["t"] - a["t"] for a, b in itertools.pairwise(marks)]
    n_samples = sum(m["samples"] for m in timed)
    n_tokens = sum(m["tokens"] for m in timed)
    med = statistics.median(step_times)
    gen_s = sum(m["gen_s"] for m in timed)
    return {
        "side": "ours", "trainer": algo, "status": "ok", "steps_timed": steps,
        "versions": {"rlhfkit": rlhfkit.__version__, "torch": torch.__version__,
                     "transformers": importlib.import_module("transformers").__version__,
                     "python": platform.python_version()},
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(wall, 3), "s_per_step": round(wall / steps, 3), "s_per_step_median": round(med, 3),
        "s_per_step_min": round(min(step_times), 3), "s_per_step_max": round(max(step_times), 3),
        "samples_per_step": round(n_samples / steps), "samples_per_s": round(n_samples / wall, 2),
        "gen_tokens": int(n_tokens), "gen_tokens_per_s": round(n_tokens / wall, 1),
        "samples_per_s_at_median": round(n_samples / steps / med, 2),
        "gen_tokens_per_s_at_median": round(n_tokens / steps / med, 1),
        "gen_time_frac": round(gen_s / wall, 3), "gen_only_tokens_per_s": round(n_tokens / gen_s, 1),
        "reward_first_step": round(marks[0]["reward"], 4), "reward_last_step": round(marks[-1]["reward"], 4),
        "reward_per_step": [round(m["reward"], 4) for m in marks],
        "cpu_util": round((timed[-1]["cpu"] - marks[0]["cpu"]) / wall, 2),
        "steal_s": round(timed[-1]["steal"] - marks[0]["steal"], 2),
        "step_times_s": [round(x, 3) for x in step_times],
        "rss_start_mb": round(rss_start, 1), "peak_rss_after_warmup_mb": round(marks[0]["peak"], 1),
        "peak_rss_at_last_step_mb": round(timed[-1]["peak"], 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_call_s": round(t1 - t0, 3),
        "ref_cache_hit_frac_per_step": [m["ref_cache"] for m in marks] if marks[0]["ref_cache"] is not None else None,
        "cpu_allocator": cpu_alloc.status(),
        "cpu_allocator_mb": {k: round(v / 2**20, 1) for k, v in cpu_alloc.stats().items()
                             if k in ("peak_live", "peak_mapped", "pooled")},
        "config": json.loads(json.dumps(to_dict(cfg)).replace(str(workdir), "<workdir>")),
    }


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------
def repo_root() -> Path:
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "pyproject.toml").exists() and (p / "src" / "rlhfkit").is_dir():
            return p
    return Path.cwd()


def load_harness(trl_dir: Path):
    """Import the shared harness module (trl_cpu_bench.py) from its directory."""
    path = trl_dir / "trl_cpu_bench.py"
    if not path.is_file():
        from rlhfkit.errors import ConfigError

        raise ConfigError(f"{path} not found: point --trl-dir at the TRL peer benchmark directory")
    spec = importlib.util.spec_from_file_location("trl_cpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def readme_hashes(trl_dir: Path) -> dict[str, str]:
    text = (trl_dir / "README.md").read_text(encoding="utf-8")
    return {k: m.group(1) for k in ARTIFACT_KEYS if (m := re.search(rf"^{k}\s+([0-9a-f]{{64}})", text, re.MULTILINE))}


def trl_pythons(trl_dir: Path) -> tuple[str, str]:
    """The harness's venv interpreters: where its setup script puts them ($TRL_VENV / $TRL_PPO_VENV or the
    script's defaults)."""
    script = (trl_dir / "setup_trl_venvs.sh").read_text()
    out = []
    for var in ("TRL_VENV", "TRL_PPO_VENV"):
        m = re.search(r'\$\{' + var + r':-([^}]+)\}', script)
        venv = os.environ.get(var) or (m.group(1) if m else "")
        out.append(str(Path(venv) / "bin" / "python"))
    return out[0], out[1]


def build_value_init(workdir: Path, seed: int) -> str:
    """PPO's value model as the harness builds TRL's (GPT2ForSequenceClassification, num_labels 1, seed
    SEED + 1), saved as our ScalarHeadModel: same backbone weights, head = its score row, bias 0."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlhfkit.models.heads import ScalarHeadModel

    torch.manual_seed(seed + 1)
    vcfg = GPT2Config.from_pretrained(str(workdir / "policy_init"))
    vcfg.num_labels = 1
    vm = GPT2ForSequenceClassification(vcfg)
    critic = ScalarHeadModel(vm.transformer)
    with torch.no_grad():
        critic.head.weight.copy_(vm.score.weight)
        critic.head.bias.zero_()
    critic.save_pretrained(workdir / "value_init")
    return str(workdir / "value_init")


def _run(cmd: list[str], log: Path, env: dict | None = None) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode


def run_ours(algo: str, args, workdir: Path) -> dict[str, Any]:
    out = workdir / f"ours_{algo}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "rlhfkit.bench.trl_peer", "--worker", algo, "--steps", str(args.steps),
           "--workdir", str(workdir), "--worker-out", str(out), "--threads", str(args.threads),
           "--micro-batch", str(args.micro_batch or (MICRO_BATCH_SYSTEM_ALLOCATOR if args.cpu_allocator == "system"
                                                     else MICRO_BATCH)[algo]),
           "--replay-mb", str(args.replay_mb), "--cpu-allocator", args.cpu_allocator]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rc = _run(cmd, workdir / f"ours_{algo}.log", env)
    if out.exists():
        return json.loads(out.read_text())
    return {"side": "ours", "trainer": algo, "status": "failed", "error": f"worker exited {rc}",
            "log_tail": (workdir / f"ours_{algo}.log").read_text()[-3000:]}


def run_trl(algo: str, args, trl_dir: Path, workdir: Path, py: str, ppo_py: str) -> dict[str, Any]:
    out = workdir / f"trl_{algo}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [py, str(trl_dir / "trl_cpu_bench.py"), "--steps", str(args.steps), "--trainers", algo,
           "--out", str(out), "--workdir", str(workdir / "trl"), "--ppo-python", ppo_py]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    rc = _run(cmd, workdir / f"trl_{algo}.log")
    if out.exists():
        res = json.loads(out.read_text().splitlines()[-1])
        res["side"] = "trl"
        return res
    return {"side": "trl", "trainer": algo, "status": "failed", "error": f"harness exited {rc}",
            "log_tail": (workdir / f"trl_{algo}.log").read_text()[-3000:]}


def summarize(rows: list[dict]) -> str:
    """The side-by-side markdown table: per trainer and side, medians over repeats."""
    def agg(rs: list[dict]) -> dict[str, Any]:
        med = statistics.median(r["s_per_step_median"] for r in rs)
        per_step = statistics.median(r["samples_per_step"] for r in rs)
        toks = statistics.median(r["gen_tokens"] / r["steps_timed"] for r in rs)
        return {"runs": len(rs), "s": med, "sps": per_step / med, "tps": toks / med,
                "rss": statistics.median(r["peak_rss_mb"] for r in rs),
                "rew": f"{rs[0]['reward_first_step']:.4f} -> {rs[0]['reward_last_step']:.4f}",
                "cpu": statistics.median(r.get("cpu_util") or 0 for r in rs)}

    out = [("| trainer | side | runs | median s/step | samples/s | gen tok/s | peak RSS MB | reward first -> last "
            "| cpu util |"), "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for algo in ALGOS:
        got = {}
        for side in ("trl", "ours"):
            rs = [r for r in rows if r["trainer"] == algo and r.get("side") == side and r.get("status") == "ok"]
            if rs:
                a = got[side] = agg(rs)
                out.append(f"| {algo} | {'TRL' if side == 'trl' else 'rlhfkit'} | {a['runs']} | {a['s']:.3f} | "
                           f"{a['sps']:.1f} | {a['tps']:.0f} | {a['rss']:.0f} | {a['rew']} | {a['cpu']:.2f} |")
        if len(got) == 2:
            ratios.append(f"| {algo} | {got['ours']['sps'] / got['trl']['sps']:.2f}x | "
                          f"{got['ours']['rss'] / got['trl']['rss']:.2f}x |")
    if ratios:
        out += ["", "| trainer | samples/s, rlhfkit / TRL (target >= 2.5x) | peak RSS, rlhfkit / TRL (target <= 0.5x) |",
                "|---|---|---|", *ratios]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlhfkit bench trl-peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run (after 1 warm-up step)")
    ap.add_argument("--trainers", default="grpo,rloo,ppo", help="comma list from grpo, rloo, ppo")
    ap.add_argument("--sides", default="trl,ours", help="trl, ours, or both (comma list)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every (trainer, side) run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run; 0 = torch's default (both sides)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="our side: completions per forward/backward micro-batch (the gradient is the same; "
                         "smaller bounds activation memory); 0 = per trainer: GRPO 32 (16 with --cpu-allocator "
                         "system), RLOO 16, PPO 32")
    ap.add_argument("--cpu-allocator", default="auto", choices=("auto", "caching", "system"),
                    help="our side: run.cpu_allocator (caching = ours, which keeps peak RSS down; system = torch's "
                         "default, glibc's heap; auto = caching where it can be built)")
    ap.add_argument("--replay-mb", type=float, default=1024.0,
                    help="our side: rollout.replay_max_mb, the memory a rollout may keep of its own forward so "
                         "that the training forward skips those matmuls (0 = off). This workload's records "
                         "are 99 MB (GRPO, RLOO) and 128 MB (PPO), so the default keeps them whole")
    ap.add_argument("--trl-dir", default="", help="the TRL peer benchmark directory (default: ../shared/bench/trl "
                                                  "relative to the repository root)")
    ap.add_argument("--workdir", default="", help="artifacts, logs and per-run files (default: a temp dir)")
    ap.add_argument("--out", default="results-trl-peer.jsonl", help="JSON lines, one per run (both sides)")
    ap.add_argument("--summarize", metavar="JSONL", default="", help="print the table of an existing results file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.summarize:
        print(summarize([json.loads(x) for x in Path(a.summarize).read_text().splitlines() if x.strip()]))
        return 0
    if a.worker:
        if a.threads:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
        res = run_worker(a.worker, a.steps, Path(a.workdir), a.threads, a.micro_batch, a.replay_mb, a.cpu_allocator)
        Path(a.worker_out).write_text(json.dumps(res))
        return 0

    from rlhfkit.errors import ConfigError

    trainers = [t.strip() for t in a.trainers.split(",") if t.strip()]
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if bad := [t for t in trainers if t not in ALGOS] + [s for s in sides if s not in ("trl", "ours")]:
        raise ConfigError(f"unknown trainer/side {bad}")
    trl_dir = Path(a.trl_dir) if a.trl_dir else repo_root().parent / "shared" / "bench" / "trl"
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.gettempdir()) / "rlhfkit_trl_peer"
    workdir.mkdir(parents=True, exist_ok=True)

    # 1. The workload's artifacts, rebuilt by the harness itself and checked against its README.
    harness = load_harness(trl_dir)
    manifest = harness.build_artifacts(workdir)
    expected = readme_hashes(trl_dir)
    wrong = {k: (manifest[k], v) for k, v in expected.items() if manifest.get(k) != v}
    if wrong or len(expected) != len(ARTIFACT_KEYS):
        raise ConfigError(f"artifact hashes differ from {trl_dir / 'README.md'}: {wrong or 'hashes not found'}")
    print(f"artifacts ok in {workdir} (hashes match {trl_dir / 'README.md'})", flush=True)
    if "ppo" in trainers and "ours" in sides:
        build_value_init(workdir, harness.SEED)

    # 2. TRL's virtualenvs (built on first use by the harness's own script).
    py = ppo_py = ""
    if "trl" in sides:
        print("checking TRL virtualenvs (first build takes a few minutes)...", flush=True)
        if subprocess.run(["bash", str(trl_dir / "setup_trl_venvs.sh")], check=False).returncode:
            raise ConfigError(f"{trl_dir / 'setup_trl_venvs.sh'} failed")
        py, ppo_py = trl_pythons(trl_dir)

    # 3. Interleaved runs; the order of the two sides alternates between repeats.
    rows: list[dict] = []
    out = Path(a.out)
    t_start = time.time()
    from rlhfkit.utils.runtime import cpu_model  # imports torch: only here, in the orchestrating process

    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()}
    for rep in range(a.repeats):
        for algo in trainers:
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                load_before = load_avg()
                tw = time.time()
                res = run_ours(algo, a, workdir) if side == "ours" else run_trl(algo, a, trl_dir, workdir, py, ppo_py)
                res.update({"repeat": rep, "process_wall_s": round(time.time() - tw, 1), "load_avg_before": load_before,
                            "load_avg_after": load_avg(), "machine": machine,
                            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "artifacts": {k: manifest[k] for k in ARTIFACT_KEYS}})
                res.pop("traceback", None)
                rows.append(res)
                out.write_text("".join(json.dumps(r) + "\n" for r in rows))
                brief = (f"median {res['s_per_step_median']:.3f} s/step, {res['samples_per_s']:.1f} samples/s "
                         f"over the whole run, peak RSS {res['peak_rss_mb']:.0f} MB" if res.get("status") == "ok"
                         else f"{res.get('status')}: {res.get('error', '')}")
                print(f"[{rep}] {algo:5s} {side:4s} {brief}  (load {load_before[:1]})", flush=True)
    print(f"\n{len(rows)} runs in {time.time() - t_start:.0f}s on {machine['cpu']} ({machine['cpus']} cpus); "
          f"results in {out}\n")
    print(summarize(rows))
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in failed:
        print(f"\n{r['side']} {r['trainer']} failed: {r.get('error')}\n{r.get('log_tail', '')[-1500:]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
