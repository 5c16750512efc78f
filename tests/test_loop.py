"""rlhfkit loop: two rounds with a simulated labeler produce every artifact, the reward model of round 2
learns from both rounds' feedback, a restart redoes nothing, and the human path waits for labels."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from rlhfkit.config import LoopConfig, ModelConfig, from_dict
from rlhfkit.models.factory import build_model
from rlhfkit.utils.checkpoint import save_model


@pytest.fixture(scope="module")
def policy_and_prompts(tmp_path_factory, tiny_tokenizer, vader_texts):
    d = tmp_path_factory.mktemp("loop")
    torch.manual_seed(0)
    save_model(d / "policy", build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=128),
                                         tiny_tokenizer), tiny_tokenizer)
    (d / "prompts.txt").write_text("\n".join(" ".join(t.split()[:4]) for t in vader_texts[:60]) + "\n")
    return d


def loop_cfg(d, run_dir, **fb):
    return from_dict(LoopConfig, {
        "run_dir": str(run_dir), "rounds": 2, "policy": str(d / "policy"),
        "prompts": {"source": str(d / "prompts.txt")}, "prompts_per_round": 10, "samples_per_prompt": 2,
        "max_new_tokens": 8, "feedback": {"kind": "rate", "labeler": "vader-rater", **fb},
        "reward": {"data": {"test_fraction": 0.2, "val_fraction": 0.2}, "run": {"device": "cpu"}},
        "ppo": {"rollout": {"prompts_per_step": 8, "max_new_tokens": 8}, "optim": {"max_steps": 2, "batch_size": 8},
                "log": {"save_every": 0, "tensorboard": False}, "run": {"device": "cpu"}},
        "eval": {"data": {"max_prompts": 4}, "rollout": {"samples_per_prompt": 1}, "run": {"device": "cpu"}}})


def test_two_rounds_with_a_simulated_labeler_and_restart(policy_and_prompts, tmp_path):
    from rlhfkit.loop import run

    root = tmp_path / "loop"
    # A random tiny policy writes no sentiment words (the vader-rater would rate everything 0), so label
    # with a reward that varies on its text.
    simulated = {"labeler": "reward-model", "labeler_reward": "rule:vowels"}
    summary = run(loop_cfg(policy_and_prompts, root, **simulated))
    for n in (1, 2):
        rd = root / f"round-{n}"
        samples = [json.loads(x) for x in (rd / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 20 and all(s["round"] == n for s in samples)
        ratings = (rd / "feedback" / "ratings.jsonl").read_text().splitlines()
        assert 0 < len(ratings) <= 20  # every non-empty, distinct sample rated once
        assert (rd / "rm" / "final" / "reward_config.json").exists()
        assert (rd / "policy" / "final" / "model.safetensors").exists()
        assert "kl_mean" in json.loads((rd / "eval.json").read_text())
    # Round 1 samples from the starting policy, round 2 from round 1's RL output.
    r2 = [json.loads(x) for x in (root / "round-2" / "samples.jsonl").read_text().splitlines()]
    assert r2[0]["model"].endswith("round-1/policy/final")
    # Round 2's reward model learns from the feedback of both rounds.
    s1 = json.loads((root / "round-1" / "rm" / "summary.json").read_text())
    s2 = json.loads((root / "round-2" / "rm" / "summary.json").read_text())
    assert s2["n_train_rated"] > s1["n_train_rated"]
    assert len({json.loads(x)["rating"] for x in (root / "round-1" / "feedback" / "ratings.jsonl")
                .read_text().splitlines()}) > 1
    # Eval prompts are held out: none of them was sampled for feedback.
    held = set((root / "prompts-eval.txt").read_text().splitlines())
    assert held and not held & {s["prompt"] for s in r2}
    assert len(summary["rounds"]) == 2 and (root / "report.html").exists()

    # A restart finds every stage done and changes nothing.
    regenerated = {"report.html", "summary.json", "config.yaml"}  # rewritten by every run, on purpose
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()
              and "report_files" not in p.parts and not (p.parent == root and p.name in regenerated)}
    from rlhfkit.loop import run as run_again

    run_again(loop_cfg(policy_and_prompts, root, **simulated))
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


def test_human_round_waits_for_labels(policy_and_prompts, tmp_path):
    from rlhfkit import loop
    from rlhfkit.feedback.store import Store

    root = tmp_path / "human"
    cfg = loop_cfg(policy_and_prompts, root, labeler="human", min_labelled=5, poll_seconds=0.2,
                   timeout_minutes=10)
    cfg.rounds = 1
    labelled = {"n": 0}
    errors: list[BaseException] = []
    loop_over = threading.Event()  # the annotator keeps looking for tasks until the loop has finished

    def person():
        try:
            answer_five()
        except BaseException as e:  # noqa: BLE001  surface it in the test, not only in the thread
            errors.append(e)

    def answer_five():
        # An annotator who starts once the round's tasks exist and answers 5 of them.
        store = Store(str(root / "feedback.db"))
        aid = store.add_annotator("alice", "pw-alice-123")
        while labelled["n"] < 5 and not loop_over.is_set():
            task = store.next_task(aid, project="human")
            if task is None:
                time.sleep(0.2)
                continue
            answer = {"kind": "rate", "submission_id": f"alice-answer-{labelled['n']:04d}", "rating": 1}
            store.submit(aid, task.item_id, answer)
            labelled["n"] += 1

    t = threading.Thread(target=person)
    root.mkdir(parents=True)
    t.start()
    try:
        loop.run(cfg)
    finally:
        loop_over.set()
        t.join()
    assert not errors, errors
    assert labelled["n"] == 5
    rows = (root / "round-1" / "feedback" / "ratings.jsonl").read_text().splitlines()
    assert len(rows) == 5 and all(json.loads(r)["annotator"] == "alice" for r in rows)


def test_wait_times_out_cleanly(policy_and_prompts, tmp_path):
    from rlhfkit import loop

    cfg = loop_cfg(policy_and_prompts, tmp_path / "t", labeler="human", poll_seconds=0.1, timeout_minutes=0.005)
    with pytest.raises(loop.WaitTimeout, match="run the loop again"):
        loop.run(cfg)
    assert json.loads((tmp_path / "t" / "round-1" / "stages.json").read_text()) == {"generate": {"samples": 20}}


def test_wait_gives_abandoned_claims_back(policy_and_prompts, tmp_path, capsys):
    """bob claims a task and walks away: while the loop waits, his claim goes back to the pool."""
    from rlhfkit import loop
    from rlhfkit.feedback.store import Store

    root = tmp_path / "r"
    cfg = loop_cfg(policy_and_prompts, root, labeler="human", poll_seconds=0.1, timeout_minutes=0.05,
                   release_after_minutes=0.002)
    claimed = threading.Event()

    def bob():
        deadline = time.time() + 60
        while not (root / "feedback.db").exists() and time.time() < deadline:
            time.sleep(0.05)           # the loop makes the store
        store = Store(str(root / "feedback.db"))
        aid = store.add_annotator("bob")
        while time.time() < deadline:
            if store.next_task(aid) is not None:
                claimed.set()
                return
            time.sleep(0.05)

    t = threading.Thread(target=bob)
    t.start()
    with pytest.raises(loop.WaitTimeout):
        loop.run(cfg)
    t.join()
    assert claimed.is_set()
    assert "released 1 task(s) left untouched" in capsys.readouterr().out
    store = Store(str(root / "feedback.db"))
    assert store.progress(store.add_annotator("carol"))["available"] == 20   # every task is claimable again
