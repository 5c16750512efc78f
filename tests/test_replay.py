"""Replay (accel/fastdecode.py): a rollout's record of its own forward stands in for the first training
forward. Log-probabilities and gradients must equal a fresh forward's (to float rounding) for GPT-2 and
Llama, with left padding, groups, micro-batches of any rows, partial records and early stops; a record
must never be used once the weights changed or its memory went to a newer rollout."""
from __future__ import annotations

import pytest
import torch

from rlhfkit.accel import fastdecode
from rlhfkit.accel import logprobs as accel_logprobs
from rlhfkit.rl.rollout import Sampler, SamplingParams, generate

TEXTS = ["The movie was", "I think that this is", "Bad", "A truly wonderful and moving film about"]


@pytest.fixture
def gpt2(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=2, n_head=4, n_embd=64, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     pad_token_id=1)
    return GPT2LMHeadModel(cfg).train()


@pytest.fixture
def llama(tiny_tokenizer, tiny_model_cfg):
    from rlhfkit.models.factory import build_model

    torch.manual_seed(1)
    tiny_model_cfg.n_kv_head = 2  # grouped-query attention
    return build_model(tiny_model_cfg, tiny_tokenizer).train()


def rollout(model, tok, n=3, replay_mb=1024.0, max_new=9, temperature=0.8, seed=0, **kw):
    ids = [tok(t)["input_ids"] for t in TEXTS]  # ragged: left padding
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(len(ids) * n, max_new, generator=g)
    return generate(model, tok, ids, SamplingParams(max_new_tokens=max_new, temperature=temperature), n,
                    uniforms=u, replay_mb=replay_mb, **kw)


def logprobs_and_grads(model, ro, parts, temperature=0.8):
    """Log-probs (B, C), entropies and the gradient of a fixed weighted sum, over the given row subsets."""
    model.zero_grad(set_to_none=True)
    w = torch.linspace(-1, 1, ro.completion_ids.numel()).view_as(ro.completion_ids)
    lps, ents = torch.zeros(ro.completion_ids.shape), torch.zeros(ro.completion_ids.shape)
    for idx in parts:
        part = ro.rows(idx)
        lp, ent = accel_logprobs(model, part, temperature, with_entropy=True)
        (lp * w[idx]).sum().backward()
        lps[idx], ents[idx] = lp.detach(), ent
    return lps, ents, [p.grad.clone() for p in model.parameters()]


def assert_same(a, b):
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = a, b
    assert torch.allclose(lp_a, lp_b, atol=1e-5), (lp_a - lp_b).abs().max()
    assert torch.allclose(ent_a, ent_b, atol=1e-5)
    for x, y in zip(g_a, g_b):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), (x - y).abs().max()


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_replay_equals_a_fresh_forward(which, request, tiny_tokenizer):
    model = request.getfixturevalue(which)
    ro = rollout(model, tiny_tokenizer)
    plain = rollout(model, tiny_tokenizer, replay_mb=0)
    assert ro.record is not None and plain.record is None
    assert ro.logz is not None and plain.logz is None  # replay scores against the sampler's normalisers
    assert torch.equal(ro.completion_ids, plain.completion_ids)  # recording does not change sampling
    from rlhfkit.models import ops

    calls, logz_calls = [], []
    real, real_logz = fastdecode.Record.replay, ops.logprobs_given_logz
    fastdecode.Record.replay = lambda self, r: calls.append(1) or real(self, r)
    ops.logprobs_given_logz = lambda *a: logz_calls.append(1) or real_logz(*a)
    try:
        B = ro.completion_ids.size(0)
        for parts in ([slice(0, B)],                                   # the whole batch
                      [slice(0, 6), slice(6, B)],                      # whole groups (prompts shared)
                      [slice(0, 4), slice(4, B)],                      # groups cut in two
                      [torch.tensor([7, 0, 11, 3]), torch.tensor([1, 2, 4, 5, 6, 8, 9, 10])]):  # any rows
            calls.clear()
            assert_same(logprobs_and_grads(model, ro, parts), logprobs_and_grads(model, plain, parts))
            assert len(calls) == len(parts)  # the record was really used, once per part
        assert logz_calls  # and the sampler's log Z scored it (no second log-softmax)
    finally:
        fastdecode.Record.replay = real
        ops.logprobs_given_logz = real_logz
    # And the sampling-time log-probabilities come back, and entropies with gradients (an entropy bonus)
    # take the full log-softmax: they equal the sampler's.
    lp = accel_logprobs(model, ro, 0.8)[0]
    assert torch.allclose(lp, ro.logprobs, atol=1e-5)
    lp, ent = accel_logprobs(model, ro, 0.8, with_entropy=True, entropy_grad=True)
    assert ent.requires_grad and torch.allclose(ent.detach(), ro.entropy, atol=1e-5)


def test_partial_record_keeps_the_most_work_per_byte_first(gpt2, tiny_tokenizer):
    dec = fastdecode.make_fast_decoder(gpt2)
    P = max(len(tiny_tokenizer(t)["input_ids"]) for t in TEXTS)
    positions = 4 * P + 12 * 8  # 4 prompts (prefilled once), 12 rows x 8 fed-back tokens

    def mb(width: int) -> float:
        return positions * width * 4 / 2**20

    full = fastdecode.Record.plan(dec, 4, 3, P, 9, 1e9)
    assert all(all(k) for k in full[0]) and full[1]
    # Room for a little: the MLP down-projections first (input width 4 x 64 per output value).
    keep, logits, _ = fastdecode.Record.plan(dec, 4, 3, P, 9, 2.5 * mb(64))
    assert keep == [[False, False, False, True], [False, False, False, True]] and not logits
    assert fastdecode.Record.plan(dec, 4, 3, P, 9, 0)[2] == 0
    # Then in layer order: the first qkv projection (3 x 64 wide) fits, nothing after it does.
    ro = rollout(gpt2, tiny_tokenizer, replay_mb=2 * mb(64) + mb(3 * 64) + 0.5 * mb(64))
    assert ro.record.keep == [[True, False, False, True], [False, False, False, True]]
    # A partial record replays exactly as well.
    plain = rollout(gpt2, tiny_tokenizer, replay_mb=0)
    parts = [slice(0, 6), slice(6, 12)]
    assert_same(logprobs_and_grads(gpt2, ro, parts), logprobs_and_grads(gpt2, plain, parts))


def saved_bytes(model, ro, rows):
    """Bytes autograd keeps from a replay's forward of `rows` for the backward, not counting the record
    itself (the rollout keeps it anyway) or the weights."""
    skip = {ro.record.flat.untyped_storage().data_ptr()}
    skip |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        accel_logprobs(model, ro.rows(rows), 0.8)
    return sum(kept.values())


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_fully_recorded_layers_replay_lean(which, request, tiny_tokenizer, monkeypatch):
    """A layer whose linear outputs are all recorded runs no norm, attention or activation in the forward
    and keeps only its residual stream (and, for Llama, the prompt's rotated keys) for the backward, which
    recomputes the rest: same gradients, and a fraction of the activation memory (so larger micro-batches
    fit)."""
    model = request.getfixturevalue(which)
    ro = rollout(model, tiny_tokenizer)
    plain = rollout(model, tiny_tokenizer, replay_mb=0)
    parts = [slice(0, 6), torch.tensor([7, 6, 11, 8, 9, 10])]
    calls = []
    cls = type(fastdecode.make_fast_decoder(model))
    real = cls._lean_block
    monkeypatch.setattr(cls, "_lean_block", lambda self, *a: calls.append(1) or real(self, *a))
    lean = logprobs_and_grads(model, ro, parts)
    assert len(calls) == 2 * 2 * len(parts)  # both layers, prompt and completion pass, every part
    assert_same(lean, logprobs_and_grads(model, plain, parts))
    lean_bytes = saved_bytes(model, ro, slice(0, 12))
    monkeypatch.setattr(cls, "lean", False)  # the per-op autograd replay
    assert_same(lean, logprobs_and_grads(model, ro, parts))
    full_bytes = saved_bytes(model, ro, slice(0, 12))
    assert lean_bytes < 0.35 * full_bytes, (lean_bytes, full_bytes)  # 0.32 for gpt2 with our attention kernels


def test_gpt2_replay_takes_the_rollouts_attention_outputs(gpt2, tiny_tokenizer, monkeypatch):
    """GPT-2 records each fully recorded layer's attention output and log-sum-exp too (prefill and our
    one-call decode step): the lean replay's backward then runs no attention forward, with the gradients
    of a fresh forward, on left-padded prompts, groups and micro-batches of any rows. A rollout whose steps
    ran elsewhere (not the one-call step) records none and replay computes the attention again."""
    from rlhfkit.accel import native

    if native.lib() is None or native.sgemm_address() is None:
        pytest.skip(f"no one-call decode step here (our kernels: {native.native_status()})")
    ro = rollout(gpt2, tiny_tokenizer)
    plain = rollout(gpt2, tiny_tokenizer, replay_mb=0)
    rec = ro.record
    assert rec.attn_ok and all(rec.keep_attn)
    assert all(t.abs().sum() > 0 for t in rec.attn_comp + rec.lse_comp)  # written by the decode steps
    forwards = []
    real = fastdecode._attention_forward
    monkeypatch.setattr(fastdecode, "_attention_forward", lambda *a: forwards.append(1) or real(*a))
    parts = [slice(0, 6), torch.tensor([7, 6, 11, 8, 9, 10])]
    recorded = logprobs_and_grads(gpt2, ro, parts)
    assert not forwards  # every attention output came from the rollout
    assert_same(recorded, logprobs_and_grads(gpt2, plain, parts))
    rec.attn_ok = False  # as after a decode step outside the one-call kernel: computed again
    assert_same(recorded, logprobs_and_grads(gpt2, ro, parts))
    assert len(forwards) == 2 * 2 * len(parts)
    monkeypatch.setattr(fastdecode.GPT2Decoder, "_c_step_args", lambda self, B: None)
    assert not rollout(gpt2, tiny_tokenizer).record.attn_ok


@pytest.mark.parametrize("optimizer", ["production", "adamw-foreach", "sgd"])
def test_record_is_not_used_after_the_weights_change(optimizer, gpt2, tiny_tokenizer):
    from rlhfkit.config import OptimConfig
    from rlhfkit.models.factory import make_optimizer

    ro = rollout(gpt2, tiny_tokenizer)
    opt = {"production": lambda: make_optimizer(gpt2, OptimConfig(lr=0.5)),  # fused AdamW: no _version bumps
           "adamw-foreach": lambda: torch.optim.AdamW(gpt2.parameters(), lr=0.5, foreach=True),
           "sgd": lambda: torch.optim.SGD(gpt2.parameters(), lr=0.5)}[optimizer]()
    logprobs_and_grads(gpt2, ro, [slice(0, 12)])
    assert ro.record.usable(gpt2)
    opt.step()  # new weights: the record describes the old ones
    assert not ro.record.usable(gpt2) and not ro.rows(slice(0, 6)).record.usable(gpt2)
    plain = ro.rows(slice(0, 12))
    plain.record = None
    assert_same(logprobs_and_grads(gpt2, ro, [slice(0, 12)]), logprobs_and_grads(gpt2, plain, [slice(0, 12)]))
    with torch.no_grad():  # no gradients wanted (e.g. a reference pass): no replay
        ro2 = rollout(gpt2, tiny_tokenizer)
        assert not ro2.record.usable(gpt2)


def test_sampler_reuses_the_last_records_memory(gpt2, tiny_tokenizer):
    s = Sampler(gpt2, tiny_tokenizer, "auto", "", replay_mb=1024)
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    params = SamplingParams(max_new_tokens=9)
    first = s(ids, params, 3, TEXTS)
    part = first.rows(slice(0, 6))
    ptr = first.record.flat.data_ptr()
    second = s(ids, params, 3, TEXTS)
    assert second.record.flat.data_ptr() == ptr  # the same memory, no new allocation
    assert not first.record.usable(gpt2) and not part.record.usable(gpt2)  # and the old one is retired
    assert second.record.usable(gpt2)


def test_early_stop_and_when_no_record_is_kept(gpt2, tiny_tokenizer):
    # Greedy decoding, with EOS set to greedy first tokens: the first row stops at once (and is fed pads
    # after), then every row does (a completion of one token, nothing fed back).
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        first = generate(gpt2, tiny_tokenizer, ids, SamplingParams(max_new_tokens=1, temperature=0), 1)
    for eos, length in (([int(first.completion_ids[0, 0])], 6), (first.completion_ids[:, 0].tolist(), 1)):
        gpt2.generation_config.eos_token_id = eos
        ro = rollout(gpt2, tiny_tokenizer, n=1, temperature=0, max_new=6)
        assert ro.completion_ids.size(1) == length and ro.record is not None and bool(ro.finished[0])
        plain = rollout(gpt2, tiny_tokenizer, n=1, temperature=0, max_new=6, replay_mb=0)
        assert_same(logprobs_and_grads(gpt2, ro, [slice(0, 4)], 1.0),
                    logprobs_and_grads(gpt2, plain, [slice(0, 4)], 1.0))
    # No record: with dropout in training mode, under gradient checkpointing, or with the hf decoder.
    gpt2.config.resid_pdrop = 0.1
    assert not fastdecode.can_record(gpt2) and rollout(gpt2, tiny_tokenizer).record is None
    gpt2.eval()
    assert fastdecode.can_record(gpt2)
    gpt2.config.resid_pdrop = 0.0
    gpt2.train()
    assert rollout(gpt2, tiny_tokenizer, backend="hf").record is None
    gpt2.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not fastdecode.can_record(gpt2)
