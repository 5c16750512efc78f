"""Several processes (torchrun, DDP over gloo on CPU) give the same losses as one process with the same
global batch, and a checkpoint resumes across world sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.utils.logging import read_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def common(corpus, run_dir, steps):
    return ["--data.source", corpus, "--data.seq_len", "32", "--model.n_layer", "2", "--model.d_model", "64",
            "--model.max_seq_len", "32", "--tokenizer.vocab_size", "300", "--optim.max_steps", str(steps),
            "--optim.warmup_steps", "1", "--log.log_every", "1", "--log.eval_every", "2",
            "--log.save_every", "2", "--log.tensorboard", "false", "--sample_prompts", "The",
            "--run.device", "cpu", "--log.run_dir", str(run_dir)]


def run(prefix, args, stage="pretrain"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([*prefix, "-m", "rlhfkit", stage, *args], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def curve(run_dir):
    return [(r["step"], r.get("loss/train"), r.get("loss/val")) for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_default_device_joins_torchrun_processes_on_cpu(tmp_path):
    """run.device auto (the default) on a machine without a GPU: the ranks form one group of 2. (accelerate
    joins CPU processes only when told cpu=True; before, each rank silently trained alone as world 1.)"""
    script = tmp_path / "world.py"
    # One file per rank: the ranks share stdout, where their lines can interleave.
    script.write_text("import sys\nfrom pathlib import Path\nfrom rlhfkit.utils.distributed import Dist\n"
                      "d = Dist('auto')\n"
                      "Path(sys.argv[1], f'rank{d.rank}.txt').write_text(f'rank {d.rank} of {d.world}')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([*TORCHRUN, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.read_text() for f in tmp_path.glob("rank*.txt")) == ["rank 0 of 2", "rank 1 of 2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, vader_texts):
    p = tmp_path_factory.mktemp("c") / "corpus.txt"
    p.write_text("\n".join(vader_texts[:1500]) + "\n")
    return str(p)


def test_two_processes_match_one_and_resume_across_world_sizes(corpus, tmp_path):
    one = tmp_path / "one"
    run([sys.executable], common(corpus, one, 4) + ["--optim.batch_size", "8"])
    two = tmp_path / "two"
    out = run(TORCHRUN, common(corpus, two, 4) + ["--optim.batch_size", "4"])
    assert "2 process(es)" in out
    c1, c2 = curve(one), curve(two)
    assert [s for s, *_ in c1] == [s for s, *_ in c2]
    for (s, a, va), (_, b, vb) in zip(c1, c2):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6) if a is not None else b is None
        assert va == pytest.approx(vb, rel=1e-5) if va is not None else vb is None

    # Stop the 2-process run at step 2, then finish it with 1 process: same curve as the 1-process run.
    mixed = tmp_path / "mixed"
    run(TORCHRUN, common(corpus, mixed, 2) + ["--optim.batch_size", "4"])
    out = run([sys.executable], common(corpus, mixed, 4) + ["--optim.batch_size", "8"])
    assert "resumed from" in out and "at step 2" in out
    # The schedule spans max_steps, so the first two steps (made with max_steps=2) differ in lr; compare
    # the steps after the resume against a 1-process run that also switched at step 2.
    ref = tmp_path / "ref"
    run([sys.executable], common(corpus, ref, 2) + ["--optim.batch_size", "8"])
    run([sys.executable], common(corpus, ref, 4) + ["--optim.batch_size", "8"])
    for (s, a, va), (_, b, vb) in zip(curve(mixed), curve(ref)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6) if a is not None else b is None


def test_sft_two_processes_match_one_with_variable_lengths(tmp_path, tiny_tokenizer, vader_texts):
    import json

    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.models.factory import build_model
    from rlhfkit.utils.checkpoint import save_model

    torch.manual_seed(0)
    base = tmp_path / "base"
    save_model(base, build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=96), tiny_tokenizer),
               tiny_tokenizer)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": t[:40], "response": " " + t[40:90]})
                              for t in vader_texts[:200]) + "\n")
    args = ["--model.name_or_path", str(base), "--data.source", str(data), "--data.template", "plain",
            "--optim.max_steps", "3", "--optim.warmup_steps", "1", "--log.log_every", "1", "--log.eval_every", "3",
            "--log.tensorboard", "false", "--sample_prompts", "Hi", "--run.device", "cpu"]
    run([sys.executable], args + ["--optim.batch_size", "8", "--log.run_dir", str(tmp_path / "one")], "sft")
    run(TORCHRUN, args + ["--optim.batch_size", "2", "--optim.grad_accum", "2",
                          "--log.run_dir", str(tmp_path / "two")], "sft")
    for (s1, a, va), (s2, b, vb) in zip(curve(tmp_path / "one"), curve(tmp_path / "two"), strict=True):
        assert s1 == s2
        assert a == pytest.approx(b, rel=1e-5) if a is not None else b is None
        assert va == pytest.approx(vb, rel=1e-5) if va is not None else vb is None


def test_deep_reward_model_two_processes_match_one(tmp_path, tiny_model, tiny_tokenizer):
    """Regression on ratings with per-item weights (target=individual: items have 1-4 ratings), LoRA on the
    backbone: the weighted loss of the global batch, split over 2 processes, is the 1-process loss."""
    import json

    import numpy as np

    from rlhfkit.utils.checkpoint import save_model
    from tests.test_reward import synthetic_texts

    lm = save_model(tmp_path / "lm", tiny_model, tiny_tokenizer)
    rng = np.random.default_rng(0)
    recs = [{"prompt": "", "completion": t, "item_id": f"t{i}", "annotator": f"a{a}",
             "rating": float(np.clip(round(s + rng.normal(0, 0.5)), -4, 4))}
            for i, (t, s) in enumerate(synthetic_texts(200, 0)) for a in range(1 + i % 4)]
    data = tmp_path / "ratings.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    args = ["--model.kind", "deep", "--model.backbone", str(lm), "--model.pooling", "last", "--model.lora_r", "4",
            "--data.source", str(data), "--loss.kind", "regression", "--loss.target", "individual",
            "--optim.max_steps", "4", "--optim.warmup_steps", "1", "--optim.lr", "1e-2", "--epochs", "0",
            "--log.log_every", "1", "--log.eval_every", "2", "--log.save_every", "0", "--log.tensorboard", "false",
            "--run.device", "cpu"]
    run([sys.executable], args + ["--optim.batch_size", "8", "--log.run_dir", str(tmp_path / "one")], "reward")
    out = run(TORCHRUN, args + ["--optim.batch_size", "4", "--log.run_dir", str(tmp_path / "two")], "reward")
    rows = {d: [r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss/train" in r or "val/score" in r]
            for d in ("one", "two")}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] and len(rows["one"]) >= 4
    for a, b in zip(rows["one"], rows["two"]):
        for k in ("loss/train", "reward/mae", "grad_norm", "val/score"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
    assert (tmp_path / "two" / "final" / "reward_config.json").exists() and "done in" in out
