"""`rlhfkit bench peers`: the shared workload, our config for it, the phase accounting, the table, our side
end to end on a tiny random Llama, and (slow) both sides for one step."""
from __future__ import annotations

import json
import math

import pytest

from rlhfkit.bench.peers import run as R
from rlhfkit.bench.peers import workload as W
from rlhfkit.config import ModelConfig
from tests.rl_utils import make_policy_dir


@pytest.fixture
def tiny_llama(tmp_path, tiny_tokenizer):
    """A 2-layer Llama with grouped-query attention (4 heads, 2 KV heads) and a chat template."""
    return make_policy_dir(tmp_path, tiny_tokenizer,
                           ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=256))


def test_rule_reward_hand_values_and_both_completion_forms():
    # "great great": 2 positive of 2 words -> 2 / sqrt(3); "a great film, not bad": 1 - 1 = 0.
    t0 = W.REWARD_SECONDS[0]
    got = W.rule_reward(["p", "p", "p"], ["great great", "a great film, not bad", "Boring. Dull!"])
    assert got == pytest.approx([2 / math.sqrt(3), 0.0, -2 / math.sqrt(3)])
    # TRL passes conversational completions as message lists: same scores.
    conv = [[{"role": "assistant", "content": "great great"}]]
    assert W.rule_reward(["p"], conv, completion_ids=[[1, 2]]) == pytest.approx([2 / math.sqrt(3)])
    assert W.REWARD_SECONDS[0] > t0


def test_prompt_texts_cut_deduplicate_and_count():
    snippets = ["one two three four five six", "one two three four five seven", "too short", "a b c d e f g"]
    got = W.prompt_texts(snippets, 2, words=5)
    assert got == ["Continue this movie review in one or two sentences: one two three four five",
                   "Continue this movie review in one or two sentences: a b c d e"]


def test_workloads_and_our_config(tiny_llama, tmp_path):
    from rlhfkit.models.reward import load_reward

    loads = R.build_workloads(tiny_llama, ["grpo", "rloo"], [0, 16], "rule", steps=3, threads=1, workdir=tmp_path)
    assert [(w.trainer, w.lora_r, w.kl_coef) for w, _ in loads] == [
        ("grpo", 0, 0.0), ("grpo", 16, 0.0), ("rloo", 0, 0.05), ("rloo", 16, 0.05)]
    w, path = loads[3]
    assert W.Workload.load(path) == w
    prompts = W.read_prompts(w.prompts_file)
    assert len(prompts) == len(set(prompts)) == 8 * (1 + 3)  # no prompt repeats within a run
    cfg = R.our_config(w, tmp_path / "run")
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens) == (8, 4, 64)
    assert cfg.optim.batch_size == 32 and cfg.optim.max_steps == 4 and cfg.optim.schedule == "constant"
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.kl.coef, cfg.data.template) == (16, 32.0, 0.05, "chat")
    # Our reward spec resolves to the very function TRL's worker is given.
    reward = load_reward(cfg.reward.spec)
    assert reward(["p"], ["great great"]).tolist() == pytest.approx(W.rule_reward(["p"], ["great great"]))


def test_step_rows_split_the_phases():
    w = W.Workload(model="m", trainer="grpo", reward="rule", steps=2)
    ours = {"side": "ours", "start": 0.0, "marks": [
        {"t": 5.0, "peak": 1, "rollout": 3.0, "reward": 0.5, "tokens": 100},   # warm-up
        {"t": 7.0, "peak": 1, "rollout": 1.2, "reward": 0.7, "ref": 0.25, "tokens": 200},  # ref: this step's
        {"t": 10.0, "peak": 1, "rollout": 1.5, "reward": 1.0, "ref": 0.5, "tokens": 300}]}
    rows = R.step_rows(ours, w)
    assert [r["s"] for r in rows] == [2.0, 3.0]
    assert [r["reward_s"] for r in rows] == pytest.approx([0.2, 0.3])
    assert [r["gen_s"] for r in rows] == pytest.approx([1.0, 1.2])      # rollout minus reward
    assert [r["score_s"] for r in rows] == pytest.approx([0.25, 0.5])   # the reference's forward
    assert [r["other_s"] for r in rows] == pytest.approx([0.55, 1.0])
    trl = {"side": "trl", "start": 0.0, "marks": [
        {"t": 5.0, "peak": 1, "gen": 2.0, "reward": 0.1, "logs": {"completions/mean_length": 10.0}},
        {"t": 8.0, "peak": 1, "gen": 3.5, "reward": 0.2, "score": 0.5, "logs": {"completions/mean_length": 20.0}},
        {"t": 10.0, "peak": 1, "gen": 4.0, "reward": 0.4, "score": 0.75, "logs": {"completions/mean_length": 30.0}}]}
    rows = R.step_rows(trl, w)
    assert [r["gen_s"] for r in rows] == pytest.approx([1.5, 0.5])       # time inside generate()
    assert [r["score_s"] for r in rows] == pytest.approx([0.5, 0.25])    # no-gradient forwards, cumulative
    assert [r["other_s"] for r in rows] == pytest.approx([0.9, 1.05])
    assert [r["tokens"] for r in rows] == [640.0, 960.0]                 # mean length x 32 completions
    with pytest.raises(RuntimeError, match="expected 3 steps"):
        R.step_rows({**ours, "marks": ours["marks"][:2]}, w)


def _row(side, s, rss, lo=None, hi=None, **over):
    return {"side": side, "trainer": "grpo", "lora_r": 16, "status": "ok", "s_per_step_median": s,
            "s_per_step_min": lo or s, "s_per_step_max": hi or s, "samples_per_s": 32 / s, "gen_tokens_per_s": 640 / s,
            "gen_s_median": s / 2, "reward_s_median": 0.01, "score_s_median": 0.25, "other_s_median": s / 2 - 0.25,
            "peak_rss_mb": rss,
            "update_flops_per_s": 2e10, "update_peak_frac": 0.25, **over}


def test_table_ratios_and_spread():
    rows = [_row("trl", 4.0, 1000, 3.0, 5.0), _row("ours", 2.0, 500, 1.8, 2.2),
            {"side": "trl", "trainer": "rloo", "lora_r": 0, "status": "failed", "error": "worker exited 1",
             "log": "x.log"}]
    out = R.table(rows)
    assert "| grpo | 16 | TRL | 1 | 4.00 | 8.00 | 160 | 2.00 | 0.010 | 0.25 | 1.75 | 1000 | 20.0 (25%) |" in out
    assert "| grpo | 16 | 2.00x | 0.50x | 50% | 20% |" in out   # spread = (max - min) / median
    assert "- trl rloo LoRA 0: worker exited 1 (log: x.log)" in out
    # Several repeats: medians over runs, spread across the runs' medians.
    out = R.table([_row("trl", 4.0, 1000), _row("trl", 6.0, 1000), _row("trl", 5.0, 1000), _row("ours", 2.0, 400)])
    assert "| grpo | 16 | TRL | 3 | 5.00 |" in out and "| grpo | 16 | 2.50x | 0.40x | 40% | 0% |" in out


def test_cli_errors():
    from rlhfkit.errors import ConfigError

    for bad in (["--trainers", "ppo"], ["--sides", "theirs"], ["--lora", "-1"], ["--lora", "x"]):
        with pytest.raises(ConfigError):
            R.main(bad)


def test_ours_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    rc = R.main(["--model", tiny_llama, "--sides", "ours", "--trainers", "grpo", "--lora", "0", "--steps", "1",
                 "--threads", "1", "--workdir", str(tmp_path / "wd"), "--out", str(out)])
    assert rc == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["status"] == "ok" and row["side"] == "ours" and row["samples_per_step"] == 32
    assert 0 < row["gen_tokens_per_step"] <= 32 * 64
    assert row["gen_s_median"] > 0 and row["other_s_median"] > 0 and row["peak_rss_mb"] > 100
    assert row["score_s_median"] == 0  # GRPO's KL weight is 0: no reference forward
    assert 0 < row["update_peak_frac"] < 1.5 and row["sgemm_peak_flops_per_s"] > 0
    assert "| grpo | full | rlhfkit | 1 |" in capsys.readouterr().out
    assert not list((tmp_path / "wd").glob("*_run"))  # the trainer's saved policy is removed after the run
    assert R.main(["--summarize", str(out)]) == 0


@pytest.mark.slow
def test_both_sides_one_step(tiny_llama, tmp_path):
    """TRL's side and ours for one step; TRL's virtualenv is built on first use (about 5-7 minutes)."""
    try:
        R.ensure_trl_venv(R.default_venv())
    except Exception as e:  # noqa: BLE001  (no package index, no disk: nothing to compare against)
        pytest.skip(f"TRL's virtualenv could not be built: {e}")
    out = tmp_path / "res.jsonl"
    rc = R.main(["--model", tiny_llama, "--trainers", "grpo,rloo", "--lora", "0,16", "--steps", "1",
                 "--threads", "1", "--workdir", str(tmp_path / "wd"), "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 0, [r.get("log_tail") for r in rows]
    assert sorted((r["side"], r["trainer"], r["lora_r"]) for r in rows) == sorted(
        (s, t, lr) for s in ("trl", "ours") for t in ("grpo", "rloo") for lr in (0, 16))
    for r in rows:
        assert r["samples_per_step"] == 32 and 0 < r["gen_tokens_per_step"] <= 32 * 64 and r["gen_s_median"] > 0
    assert {r["versions"].get("trl") for r in rows if r["side"] == "trl"} == {"1.16.0"}
