"""The trl-peer harness plumbing: artifact hash check, TRL venv discovery, PPO value-model init like TRL's."""
from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.bench import trl_peer


def test_readme_hashes_and_venv_discovery(tmp_path, monkeypatch):
    h = "ab" * 32
    (tmp_path / "README.md").write_text(f"text\n```\ncorpus_sha256      {h}\ntokenizer_sha256   {h}\n"
                                        f"prompts_sha256     {h}\npolicy_init_sha256 {h}   (state_dict)\n```\n")
    assert trl_peer.readme_hashes(tmp_path) == {k: h for k in trl_peer.ARTIFACT_KEYS}
    (tmp_path / "setup_trl_venvs.sh").write_text('VENV="${TRL_VENV:-/somewhere/a}"\n'
                                                 'VENV_PPO="${TRL_PPO_VENV:-/somewhere/b}"\n')
    monkeypatch.delenv("TRL_VENV", raising=False)
    monkeypatch.setenv("TRL_PPO_VENV", str(tmp_path / "ppo"))
    py, ppo_py = trl_peer.trl_pythons(tmp_path)
    assert py == "/somewhere/a/bin/python" and ppo_py == str(tmp_path / "ppo" / "bin" / "python")


def test_value_init_is_trls_value_model(tmp_path):
    """Our critic starts from exactly the GPT2ForSequenceClassification (seed 1) the harness gives TRL."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from rlhfkit.models.heads import ScalarHeadModel

    cfg = GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64, pad_token_id=1)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "policy_init")
    trl_peer.build_value_init(tmp_path, seed=0)
    ours = ScalarHeadModel.from_pretrained(tmp_path / "value_init").eval()
    torch.manual_seed(1)
    vcfg = GPT2Config.from_pretrained(str(tmp_path / "policy_init"))
    vcfg.num_labels = 1
    theirs = GPT2ForSequenceClassification(vcfg).eval()
    ids = torch.randint(2, 300, (3, 10))
    with torch.no_grad():
        h = theirs.transformer(input_ids=ids).last_hidden_state
        assert torch.allclose(ours(ids), theirs.score(h).squeeze(-1), atol=1e-6)


@pytest.mark.slow
def test_our_side_runs_on_the_harness_workload(tmp_path):
    """End to end on the real workload (about 30 s): artifacts rebuilt and checked, one step per trainer."""
    root = trl_peer.repo_root().parent / "shared" / "bench" / "trl"
    if not (root / "trl_cpu_bench.py").exists():
        pytest.skip("the TRL peer harness directory is not next to this checkout")
    out = tmp_path / "r.jsonl"
    rc = trl_peer.main(["--sides", "ours", "--steps", "1", "--trainers", "grpo,rloo,ppo", "--workdir",
                        str(tmp_path / "w"), "--out", str(out), "--threads", "1"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 0 and [r["trainer"] for r in rows] == ["grpo", "rloo", "ppo"]
    for r in rows:
        assert r["status"] == "ok" and r["samples_per_step"] == 64 and 0.2 < r["reward_first_step"] < 0.6
