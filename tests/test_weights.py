"""utils/weights.py: the weights generation that caches of work from a model's weights are keyed on. It
must move on at every optimizer step (fused AdamW updates parameters without bumping their `_version`),
every load of weights and LoRA merge, and only there."""
from __future__ import annotations

import pytest
import torch

from rlhfkit.config import OptimConfig
from rlhfkit.models.factory import make_optimizer
from rlhfkit.utils import weights


def step_once(model, opt):
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("make", [
    lambda m: make_optimizer(m, OptimConfig(lr=0.1)),  # the production optimizer: fused AdamW
    lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, foreach=True),
    lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, foreach=False),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
], ids=["fused-adamw", "foreach-adamw", "for-loop-adamw", "sgd"])
def test_every_optimizer_step_moves_the_stamp(make):
    model = torch.nn.Linear(4, 2)
    opt = make(model)
    before, w0 = weights.stamp(model), model.weight.detach().clone()
    assert weights.stamp(model) == before  # nothing happened: the same stamp
    step_once(model, opt)
    assert not torch.equal(model.weight, w0)
    assert weights.stamp(model) != before


def test_fused_adamw_leaves_versions_alone_so_they_cannot_be_the_key():
    """Why the stamp exists: this is what hid the replay bug."""
    model = torch.nn.Linear(4, 2)
    opt = make_optimizer(model, OptimConfig(lr=0.1))
    if not opt.defaults.get("fused"):
        pytest.skip("torch has no fused AdamW for this device")
    versions = [p._version for p in model.parameters()]
    step_once(model, opt)
    assert [p._version for p in model.parameters()] == versions


def test_frozen_models_keep_their_stamp_across_other_models_steps():
    policy, ref = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2).requires_grad_(False)
    opt = make_optimizer(policy, OptimConfig(lr=0.1))
    ref_before = weights.stamp(ref)
    step_once(policy, opt)
    assert weights.stamp(ref) == ref_before  # a reference's prompt cache survives the policy's steps
    weights.changed()  # a load of weights anywhere: every cache goes
    assert weights.stamp(ref) != ref_before


def test_loads_and_lora_move_the_stamp(tmp_path, tiny_model_cfg, tiny_tokenizer):
    from rlhfkit.models.factory import apply_lora, build_model
    from rlhfkit.utils.checkpoint import load_weights_into

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg, tiny_tokenizer)
    model.save_pretrained(tmp_path / "m")
    before = weights.stamp(model)
    load_weights_into(model, tmp_path / "m")
    assert weights.stamp(model) != before

    tiny_model_cfg.lora_r = 4
    lora = apply_lora(model, tiny_model_cfg)
    opt = make_optimizer(lora, OptimConfig(lr=0.1))
    before = weights.stamp(lora)
    ids = torch.randint(0, 100, (2, 5))
    lora(input_ids=ids).logits.square().mean().backward()
    opt.step()  # only the adapters change
    assert weights.stamp(lora) != before
