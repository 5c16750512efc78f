"""`rlhfkit loop`: rounds of RLHF with the human in the loop.

Round N, in run_dir/round-N/:
  samples.jsonl     the current policy's completions of this round's prompts
  (feedback store)  imported as tasks (rate, pair or rank) with `feedback.overlap` annotators per item;
                    labelled by simulated labelers, or by people in `rlhfkit feedback serve` (the round
                    waits, with a progress line, until `feedback.min_labelled` items are done)
  feedback/         the round's export (ratings/pairs/rankings/edits .jsonl, docs/formats.md)
  rm/               a reward model trained on the feedback of rounds 1..N
  policy/           the RL stage (ppo, grpo, rloo or reinforce against rm/, or dpo on the pairs)
  eval.json         the round's policy against the round-1 policy
stages.json records the finished stages: a run started again skips them, and a stage cut off mid-way
resumes from its own checkpoint.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from rlhfkit.config import LoopConfig
from rlhfkit.errors import RLHFKitError

LOSS_FOR_KIND = {"rate": "regression", "pair": "bt", "rank": "ranking"}
EXPORT_FOR_KIND = {"rate": "ratings", "pair": "pairs", "rank": "rankings"}


class WaitTimeout(RLHFKitError):
    """Humans did not label enough items in time; starting the loop again resumes the wait."""


class Round:
    def __init__(self, root: Path, n: int) -> None:
        self.n, self.dir = n, root / f"round-{n}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = self.dir / "stages.json"
        self.done: dict[str, Any] = json.loads(self._file.read_text()) if self._file.exists() else {}

    def finish(self, stage: str, info: Any = True) -> None:
        self.done[stage] = info
        self._file.write_text(json.dumps(self.done, indent=1))


def _policy_of(root: Path, n: int, cfg: LoopConfig) -> str:
    """The policy that samples in round n: the round-1 policy, then each round's RL output."""
    return cfg.policy if n == 1 else str(root / f"round-{n - 1}" / "policy" / "final")


def split_prompts(cfg: LoopConfig, root: Path) -> tuple[Any, Any]:
    """Prompt configs for training (feedback samples and RL) and for evaluation: the last eval_fraction of
    the prompt list (after a seeded shuffle) is held out and never sampled for feedback or trained on.
    Written once to run_dir/prompts-{train,eval}.txt, so every round and every restart sees the same."""
    train_f, eval_f = root / "prompts-train.txt", root / "prompts-eval.txt"
    if not (train_f.exists() and eval_f.exists()):
        import numpy as np

        from rlhfkit.config import TokenizerConfig
        from rlhfkit.models.factory import get_tokenizer
        from rlhfkit.rl.common import load_prompts

        texts = [t.replace("\n", " ") for t in load_prompts(cfg.prompts, get_tokenizer(TokenizerConfig(), cfg.policy)).texts]
        order = np.random.default_rng(cfg.seed).permutation(len(texts))
        n_eval = max(1, round(cfg.eval_fraction * len(texts)))
        eval_f.write_text("\n".join(texts[i] for i in order[:n_eval]) + "\n", encoding="utf-8")
        train_f.write_text("\n".join(texts[i] for i in order[n_eval:]) + "\n", encoding="utf-8")
    train_cfg, eval_cfg = copy.deepcopy(cfg.prompts), copy.deepcopy(cfg.eval.data)
    train_cfg.source, train_cfg.max_prompts = str(train_f), 0
    eval_cfg.source, eval_cfg.template = str(eval_f), cfg.prompts.template
    return train_cfg, eval_cfg


def generate(cfg: LoopConfig, rd: Round, policy: str, prompt_cfg: Any) -> list[dict]:
    import torch

    from rlhfkit.config import TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm
    from rlhfkit.rl.common import load_prompts
    from rlhfkit.rl.rollout import SamplingParams
    from rlhfkit.rl.rollout import generate as sample

    tok = get_tokenizer(TokenizerConfig(), policy)
    prompts = load_prompts(prompt_cfg, tok)
    k = cfg.prompts_per_round
    # Round n takes the next slice of the prompt list (wrapping around), so rounds see fresh prompts.
    idx = [((rd.n - 1) * k + i) % len(prompts.texts) for i in range(k)]
    model = load_causal_lm(policy).eval()
    torch.manual_seed(cfg.seed * 1000 + rd.n)
    ro = sample(model, tok, [prompts.ids[i] for i in idx],
                SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature),
                cfg.samples_per_prompt, prompts=[prompts.texts[i] for i in idx])
    rows = [{"prompt": p, "completion": c, "model": policy, "round": rd.n}
            for p, c in zip(ro.prompts, ro.completions)]
    with open(rd.dir / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows


def collect_feedback(cfg: LoopConfig, rd: Round, store: Any, project: str) -> dict:
    """Import the samples as tasks (idempotent), get them labelled, export the round."""
    from rlhfkit.feedback.export import export
    from rlhfkit.feedback.labelers import make_labeler, run_labeler

    fb = cfg.feedback
    rows = [json.loads(line) for line in (rd.dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    store.import_samples(rows, project=project, round=rd.n, kinds=(fb.kind,), overlap=fb.overlap,
                         group_size=max(2, cfg.samples_per_prompt))
    # Items of the round (a re-import after a crash adds none, so count what the store holds).
    items = next(r["items"].get(fb.kind, 0) for r in store.stats(project)["rounds"] if r["round"] == rd.n)
    if fb.labeler == "human":
        wait_for_humans(cfg, rd, store, project, fb.min_labelled or items)
    else:
        for seed in range(fb.overlap):  # k simulated annotators, each answering every item once
            labeler = make_labeler(fb.labeler, reward=fb.labeler_reward, temperature=fb.temperature,
                                   seed=cfg.seed * 100 + seed)
            n = run_labeler(store, labeler, project=project, round=rd.n, name=f"{fb.labeler}-{seed}")
            print(f"  {fb.labeler}-{seed}: {n} answers", flush=True)
    out = export(store, project, rd.dir / "feedback", round=rd.n)
    return {k: v["records"] for k, v in out.items()}


def wait_for_humans(cfg: LoopConfig, rd: Round, store: Any, project: str, target: int) -> None:
    fb = cfg.feedback
    db = fb.db or str(Path(cfg.run_dir) / "feedback.db")
    print(f"  waiting for people to label {target} items of round {rd.n} (project {project!r}).\n"
          f"  Serve the app:  rlhfkit feedback serve --db {db}\n"
          f"  Add annotators: rlhfkit feedback users add NAME --db {db}", flush=True)
    t0, last = time.time(), -1
    while True:
        done = store.count_labelled(project, rd.n, kinds=(fb.kind,))
        if done != last:
            print(f"  labelled {done}/{target}", flush=True)
            last = done
        if done >= target:
            return
        if fb.release_after_minutes:
            n = store.release_stale(project, rd.n, fb.release_after_minutes * 60)
            if n:
                print(f"  released {n} task(s) left untouched for {fb.release_after_minutes:g} min", flush=True)
        if fb.timeout_minutes and time.time() - t0 > fb.timeout_minutes * 60:
            raise WaitTimeout(f"round {rd.n}: only {done}/{target} items labelled after "
                              f"{fb.timeout_minutes} min; run the loop again to keep waiting")
        time.sleep(fb.poll_seconds)


def train_reward(cfg: LoopConfig, root: Path, rd: Round) -> dict:
    from rlhfkit.train.reward import train

    kind = EXPORT_FOR_KIND[cfg.feedback.kind]
    files = [str(root / f"round-{i}" / "feedback" / f"{kind}.jsonl") for i in range(1, rd.n + 1)]
    files = [f for f in files if Path(f).exists() and Path(f).stat().st_size]
    rcfg = copy.deepcopy(cfg.reward)
    rcfg.data.source = files
    rcfg.loss.kind = LOSS_FOR_KIND[cfg.feedback.kind]
    rcfg.log.run_dir = str(rd.dir / "rm")
    return train(rcfg)


def train_policy(cfg: LoopConfig, root: Path, rd: Round, policy: str, prompt_cfg: Any) -> dict:
    import importlib

    scfg = copy.deepcopy(getattr(cfg, cfg.algo))
    scfg.model.name_or_path = policy
    scfg.log.run_dir = str(rd.dir / "policy")
    if cfg.algo == "dpo":
        pairs = rd.dir / "pairs-so-far.jsonl"
        with open(pairs, "w", encoding="utf-8") as out:
            for i in range(1, rd.n + 1):
                f = root / f"round-{i}" / "feedback" / "pairs.jsonl"
                if f.exists():
                    out.write(f.read_text(encoding="utf-8"))
        scfg.data.source = str(pairs)
        from rlhfkit.train.dpo import train
    else:
        scfg.reward.spec = str(rd.dir / "rm" / "final")
        scfg.data = copy.deepcopy(prompt_cfg)
        train = importlib.import_module(f"rlhfkit.rl.{cfg.algo}").train
    return train(scfg)


def evaluate_round(cfg: LoopConfig, rd: Round, eval_prompts: Any) -> dict:
    from rlhfkit.eval.evaluate import evaluate

    ecfg = copy.deepcopy(cfg.eval)
    ecfg.policy, ecfg.reference = str(rd.dir / "policy" / "final"), cfg.policy
    if not ecfg.reward and (rd.dir / "rm" / "final").exists():
        ecfg.reward = str(rd.dir / "rm" / "final")  # the round's proxy
    ecfg.data = eval_prompts
    ecfg.rollout.max_new_tokens = cfg.max_new_tokens
    ecfg.out = str(rd.dir / "eval.json")
    return evaluate(ecfg)


def run(cfg: LoopConfig) -> dict[str, Any]:
    from rlhfkit.eval.report import build_report
    from rlhfkit.feedback.store import Store

    t0 = time.time()
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    from rlhfkit.config import to_yaml

    (root / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    store = Store(cfg.feedback.db or str(root / "feedback.db"))
    project = cfg.feedback.project or root.resolve().name
    train_prompts, eval_prompts = split_prompts(cfg, root)
    rounds = []
    for n in range(1, cfg.rounds + 1):
        rd = Round(root, n)
        policy = _policy_of(root, n, cfg)
        print(f"== round {n}/{cfg.rounds} ({rd.dir}), policy {policy}", flush=True)
        if "generate" not in rd.done:
            rows = generate(cfg, rd, policy, train_prompts)
            rd.finish("generate", {"samples": len(rows)})
        if "feedback" not in rd.done:
            rd.finish("feedback", collect_feedback(cfg, rd, store, project))
        print(f"  feedback: {rd.done['feedback']}", flush=True)
        if cfg.algo != "dpo" and "reward" not in rd.done:
            s = train_reward(cfg, root, rd)
            rd.finish("reward", {k: s.get(k) for k in ("test", "val_score", "n_train_rated", "n_train_comparisons")})
        if "policy" not in rd.done:
            s = train_policy(cfg, root, rd, policy, train_prompts)
            rd.finish("policy", {k: v for k, v in (s or {}).items() if isinstance(v, (int, float, str))})
        if "eval" not in rd.done:
            ev = evaluate_round(cfg, rd, eval_prompts)
            rd.finish("eval", {k: v["mean"] for k, v in ev.items() if isinstance(v, dict) and "mean" in v})
        rounds.append({"round": n, **{k: rd.done[k] for k in ("feedback", "eval")}})
    summary = {"rounds": rounds, "project": project, "wall_s": round(time.time() - t0, 1)}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    report = build_report(root, title=f"rlhfkit loop: {project}")
    print(f"done: {cfg.rounds} rounds; report {report}", flush=True)
    return summary
