"""The supervised stages' driver: a stop is agreed by every process; final/ is the best validation model
and early stopping counts evaluations without improvement (through pretrain, validation losses by hand)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from rlhfkit.train import driver, pretrain
from rlhfkit.utils.runtime import GracefulStop
from tests.test_pretrain import corpus, tiny_cfg  # noqa: F401  (corpus is a fixture)


class TwoRanks:
    """A Dist of world 2 whose sum adds what the other rank reports."""

    world = 2

    def __init__(self, other: float) -> None:
        self.other = other

    def sum(self, value: float) -> float:
        return value + self.other


def test_a_stop_seen_by_one_process_stops_all():
    quiet = GracefulStop()
    assert not driver.should_stop(TwoRanks(0.0), quiet, time.time(), 0)
    assert driver.should_stop(TwoRanks(1.0), quiet, time.time(), 0)  # the other rank saw Ctrl-C
    over = time.time() - 120  # this rank is past a 1-minute limit, the other not yet
    assert driver.should_stop(TwoRanks(0.0), quiet, over, 1)


def test_final_is_the_best_model_and_patience_counts_evaluations(corpus, tmp_path, monkeypatch):  # noqa: F811
    # Validation losses by hand: best at step 2; steps 3 and 4 are no better, so patience 2 stops at step 4.
    val = iter([3.0, 2.0, 2.5, 2.0])
    monkeypatch.setattr(pretrain, "evaluate", lambda *a, **k: next(val))
    run = tmp_path / "r"
    s = pretrain.train(tiny_cfg(corpus, run, early_stop_patience=2,
                                log={"eval_every": 1, "save_every": 1, "keep_checkpoints": 3}))
    assert s["steps"] == 4 and s["stopped_early"] and s["best_val_loss"] == 2.0
    from safetensors.torch import load_file

    final = load_file(str(run / "final" / "model.safetensors"))
    at = {n: load_file(str(run / "checkpoints" / f"step-{n:06d}" / "model" / "model.safetensors"))
          for n in (2, 4)}
    assert all(torch.equal(final[k], at[2][k]) for k in final)  # final/ holds step 2's weights...
    assert not all(torch.equal(final[k], at[4][k]) for k in final)  # ...not the last ones
    assert [r["loss/val"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss/val" in r] == \
        pytest.approx([3.0, 2.0, 2.5, 2.0])


def test_measuring_the_cpu_peak_draws_nothing_from_the_training_rng(tmp_path, monkeypatch):
    """A run measures the CPU's peak FLOP/s once per machine (then reads its cache): the first run on a
    fresh machine must draw the same dropout stream as every later one, or a resume is not exact."""
    from rlhfkit.utils import runtime

    monkeypatch.setenv("RLHFKIT_DATA_DIR", str(tmp_path))  # nothing cached: it measures
    monkeypatch.setattr(runtime, "_CPU_PEAK", {})
    torch.manual_seed(0)
    assert runtime.peak_flops(torch.device("cpu")) > 0
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))
