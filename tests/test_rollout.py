"""Rollout engine: our KV-cache decoders reproduce HF's forward, sampling filters do what they say, stops,
streaming, and the training-side log-probabilities match the sampling-time ones."""
from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit.accel import fastdecode
from rlhfkit.rl.rollout import (
    HFDecoder,
    SamplingParams,
    completion_logprobs,
    generate,
    left_pad,
    sample,
    sample_next,
    stream,
)


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_layer=2, n_head=4, n_embd=64, n_positions=128,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_gqa_llama(tiny_tokenizer, tiny_model_cfg):
    from rlhfkit.models.factory import build_model

    torch.manual_seed(1)
    tiny_model_cfg.n_kv_head = 2  # grouped-query attention: 4 query heads share 2 key/value heads
    return build_model(tiny_model_cfg, tiny_tokenizer).eval()


def prompts_ids(tok):
    texts = ["The movie was", "I think that this is", "Bad", "A truly wonderful and moving film about"]
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_model", "tiny_gqa_llama"])
def test_fast_decoder_matches_hf_forward(which, request, tiny_tokenizer):
    model = request.getfixturevalue(which)
    assert fastdecode.supported(model)
    ids, mask = left_pad(prompts_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id)  # ragged: left padding
    extra = torch.randint(5, 500, (ids.size(0) * 2, 6))
    with torch.no_grad():
        for dec in (fastdecode.make_fast_decoder(model), HFDecoder(model)):
            first = dec.start(ids, mask, 2, max_new=6)  # each prompt twice
            steps = [dec.step(extra[:, t]) for t in range(5)]
            got = torch.stack([first] + steps, 1)
            if isinstance(dec, HFDecoder):
                hf_cached = got
            else:
                fast = got
        # Reference: one full forward over prompt + the fed tokens, positions counting real tokens only.
        full = torch.cat([ids.repeat_interleave(2, 0), extra[:, :5]], 1)
        fmask = torch.cat([mask.repeat_interleave(2, 0), torch.ones_like(extra[:, :5])], 1)
        pos = (fmask.cumsum(-1) - 1).clamp(min=0)
        ref = model(input_ids=full, attention_mask=fmask, position_ids=pos).logits[:, ids.size(1) - 1:]
    assert torch.allclose(fast, ref, atol=1e-4), (fast - ref).abs().max()
    assert torch.allclose(hf_cached, ref, atol=1e-4), (hf_cached - ref).abs().max()


@pytest.mark.parametrize("budget_mb", [0, 0.05, 100])  # no record, some layers' outputs, all and the logits
def test_gpt2_decode_step_in_one_call_equals_the_epilogues_and_the_plain_ops(budget_mb, tiny_gpt2, tiny_tokenizer,
                                                                             monkeypatch):
    """Where our kernels are built, GPT-2's decode step is one call of ours (GPT2Decoder._c_step: blocks,
    attention over the cache and LM head in C around torch's sgemm). Without it, the step multiplies without
    biases and fuses bias, KV-cache writes, GELU and residual adds (_step_blocks); without our kernels it
    takes torch's ops. All three give the same logits, KV cache and recorded layer outputs. The one-call
    step runs both ways of splitting its products between threads (its own column split, native.split_cols,
    and the BLAS's threads) at two threads, where the split and the attention's row tasks are shared out."""
    from rlhfkit.accel import native
    from rlhfkit.accel.native import native_status

    if not native_status().startswith("on"):
        pytest.skip(f"our kernels are {native_status()}")
    model = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        for name, p in model.named_parameters():  # GPT-2 starts with zero biases: make them count
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    ids, mask = left_pad(prompts_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id)  # ragged: masked keys
    U, P, G, n = ids.size(0), ids.size(1), 3, 7
    extra = torch.randint(5, 500, (U * G, n))
    calls = {"c": 0, "blocks": 0}
    for name, key in (("_c_step", "c"), ("_step_blocks", "blocks")):
        real = getattr(fastdecode.GPT2Decoder, name)
        monkeypatch.setattr(fastdecode.GPT2Decoder, name,
                            lambda self, x, real=real, key=key: calls.__setitem__(key, calls[key] + 1) or real(self, x))
    out, kv, recs = {}, {}, {}
    split = native.split_cols()
    threads = torch.get_num_threads()
    for mode in ("c", "c_other_split", "blocks", "plain"):
        if mode == "plain":
            monkeypatch.setattr(fastdecode, "native_ok", lambda *t: False)
        other = mode == "c_other_split"
        monkeypatch.setattr(native, "split_cols", lambda other=other: 1 - split if other else split)
        dec = fastdecode.make_fast_decoder(model)
        rec = dec.record(model, U, G, P, n, budget_mb) if budget_mb else None
        torch.set_num_threads(2 if mode.startswith("c") else threads)
        try:
            with torch.no_grad():
                first = dec.start(ids, mask, G, max_new=n)
                assert (dec.cstep is not None) == (mode != "plain")
                if mode == "blocks":
                    dec.cstep = None
                else:
                    assert dec.cstep is None or dec.cstep.split_cols == (1 - split if other else split)
                out[mode] = torch.stack([first] + [dec.step(extra[:, t]) for t in range(n - 1)], 1)
        finally:
            torch.set_num_threads(threads)
        kv[mode] = dec.KV[:, :P + n - 1]  # the last slot is never written
        recs[mode] = [] if rec is None else [t for layer in rec.comp for t in layer if t is not None] + (
            [rec.logits] if rec.logits is not None else [])
    assert calls == {"c": 2 * (n - 1), "blocks": n - 1}
    if budget_mb == 0.05:
        assert 0 < len(recs["c"]) < 8  # some layers recorded, the others through scratch buffers
    for mode in ("c_other_split", "blocks", "plain"):
        torch.testing.assert_close(out["c"], out[mode], rtol=0, atol=1e-5)
        torch.testing.assert_close(kv["c"], kv[mode], rtol=0, atol=1e-5)
        for x, y in zip(recs["c"], recs[mode], strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def biased_gqa_llama(tok, bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=bias, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases start at zero: make them count
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("budget_mb", [0, 0.03, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_llama_packed_decode_step_equals_the_plain_step(bias, budget_mb, tiny_tokenizer, monkeypatch):
    """Where MKL's packed sgemm is found, a Llama decode step multiplies by weights packed once per rows
    and weights (LlamaDecoder._packed_step: q|k|v and gate|up in one product each, biases after). It gives
    the logits, KV cache and recorded layer outputs of the per-op step (fully, partly and not recorded)."""
    from rlhfkit.accel import native

    model = biased_gqa_llama(tiny_tokenizer, bias)
    if not native.packed_ok(model.lm_head.weight):
        pytest.skip("no packed sgemm here (our kernels off, or torch's BLAS is not MKL)")
    ids, mask = left_pad(prompts_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    U, P, G, n = ids.size(0), ids.size(1), 3, 7
    extra = torch.randint(5, 500, (U * G, n))
    out, kv, recs, used = {}, {}, {}, []
    real_packs = fastdecode.decode_packs
    for mode in ("packed", "plain"):
        monkeypatch.setattr(fastdecode, "decode_packs", (lambda d, r: used.append(r) or real_packs(d, r))
                            if mode == "packed" else (lambda d, r: None))
        dec = fastdecode.make_fast_decoder(model)
        rec = dec.record(model, U, G, P, n, budget_mb) if budget_mb else None
        with torch.no_grad():
            first = dec.start(ids, mask, G, max_new=n)
            out[mode] = torch.stack([first] + [dec.step(extra[:, t]) for t in range(n - 1)], 1)
        kv[mode] = dec.KV[:, :P + n - 1]
        recs[mode] = [] if rec is None else [t for layer in rec.comp for t in layer if t is not None] + (
            [rec.logits] if rec.logits is not None else [])
    assert used == [U * G] * (n - 1)
    if budget_mb == 0.03:
        assert 0 < len(recs["packed"]) < 14  # some layers recorded, the others through scratch buffers
    torch.testing.assert_close(out["packed"], out["plain"], rtol=0, atol=1e-5)
    torch.testing.assert_close(kv["packed"], kv["plain"], rtol=0, atol=1e-5)
    for x, y in zip(recs["packed"], recs["plain"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_llama_packed_weights_follow_an_optimizer_step(tiny_tokenizer):
    """The packed weights are packed again, in place, when the weights stamp moves on (a fused AdamW step):
    decoding after the step gives HF's logits of the updated model."""
    from rlhfkit.accel import native

    model = biased_gqa_llama(tiny_tokenizer, True)
    if not native.packed_ok(model.lm_head.weight):
        pytest.skip("no packed sgemm here (our kernels off, or torch's BLAS is not MKL)")
    ids, mask = left_pad(prompts_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    extra = torch.randint(5, 500, (ids.size(0) * 2, 4))

    def decode(dec):
        with torch.no_grad():
            first = dec.start(ids, mask, 2, max_new=4)
            return torch.stack([first] + [dec.step(extra[:, t]) for t in range(3)], 1)

    decode(fastdecode.make_fast_decoder(model))
    packs = fastdecode._PACKS[model]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(input_ids=extra).logits.square().mean().backward()
    opt.step()
    fast, hf = decode(fastdecode.make_fast_decoder(model)), decode(HFDecoder(model))
    assert fastdecode._PACKS[model] is packs  # packed again in place
    torch.testing.assert_close(fast, hf, rtol=0, atol=1e-4)


def test_the_one_call_step_checks_the_sgemm_it_calls():
    """The decode step calls torch's BLAS sgemm_ only once it has multiplied small matrices right; a
    function that writes nothing (or anything else) is refused, and the decoder then steps per op."""
    import ctypes
    from pathlib import Path

    from rlhfkit.accel import native

    if not native.native_status().startswith("on"):
        pytest.skip(f"our kernels are {native.native_status()}")
    noop = ctypes.CFUNCTYPE(None)(lambda: None)  # called with sgemm's arguments, ignores them
    assert not native.sgemm_works(ctypes.cast(noop, ctypes.c_void_p).value)
    address = native.sgemm_address()
    if address is None:
        pytest.skip("this torch exports no sgemm_")
    assert native.sgemm_works(address)
    # Sizes go as 64-bit integers: an ILP64 sgemm (64-bit sizes; MKL exports one as sgemm_64_) reads them
    # right too.
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    if hasattr(lib, "sgemm_64_"):
        assert native.sgemm_works(ctypes.cast(lib.sgemm_64_, ctypes.c_void_p).value)


def test_fast_and_hf_backends_sample_the_same(tiny_model, tiny_tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    out = {}
    for backend in ("fast", "hf"):
        torch.manual_seed(123)
        out[backend] = generate(tiny_model, tiny_tokenizer, prompts_ids(tiny_tokenizer), params, n=3,
                                backend=backend)
    assert torch.equal(out["fast"].completion_ids, out["hf"].completion_ids)
    assert torch.allclose(out["fast"].logprobs, out["hf"].logprobs, atol=1e-4)
    assert out["fast"].completions == out["hf"].completions


def test_rollout_shapes_masks_and_training_logprobs(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    ro = generate(tiny_model, tiny_tokenizer, prompts_ids(tiny_tokenizer), SamplingParams(max_new_tokens=10), n=2)
    B = 8
    assert ro.prompt_ids.shape[0] == B and ro.completion_ids.shape == (B, 10) and ro.group_size == 2
    assert ro.prompts[0] == ro.prompts[1] == "The movie was"
    # Masks are 1 then 0, and EOS (when sampled) is the last counted token.
    for b in range(B):
        n = int(ro.lengths[b])
        assert ro.completion_mask[b, :n].all() and not ro.completion_mask[b, n:].any()
        assert bool(ro.finished[b]) == (n > 0 and int(ro.completion_ids[b, n - 1]) == tiny_tokenizer.eos_token_id)
    # The training forward gives the sampling-time log-probabilities back, with the shared-prompt path
    # (groups of 2) and the plain path (group_size 1) agreeing.
    tiny_model.train()
    lp_shared, ent = completion_logprobs(tiny_model, ro, with_entropy=True)
    ro1 = ro.rows(slice(0, B))
    ro1.group_size = 1
    lp_plain, _ = completion_logprobs(tiny_model, ro1)
    assert torch.allclose(lp_shared, ro.logprobs, atol=1e-4)
    assert torch.allclose(lp_plain, ro.logprobs, atol=1e-4)
    assert ent.shape == (B, 10) and bool((ent > 0).all())
    # And gradients of both paths agree.
    g = []
    for r in (ro, ro1):
        tiny_model.zero_grad()
        completion_logprobs(tiny_model, r)[0].sum().backward()
        g.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None]))
    assert torch.allclose(g[0], g[1], atol=1e-4)


def test_sample_next_filters():
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    tok, lp = sample_next(logits, top_k=2)
    assert set(tok.tolist()) == {0, 1}
    # log-probs are of the untruncated tempered distribution
    assert torch.allclose(lp[tok == 0], torch.log_softmax(logits[0], -1)[0].expand_as(lp[tok == 0]))
    p = torch.softmax(logits[0], -1)  # [0.636, 0.234, 0.086, 0.032, 0.012]
    tok, _ = sample_next(logits, top_p=0.8)  # 0.636 < 0.8 -> keep token 1 too, then stop
    assert set(tok.tolist()) == {0, 1}
    freq0 = (tok == 0).float().mean().item()
    assert abs(freq0 - p[0] / (p[0] + p[1])) < 0.03  # renormalised over the kept tokens
    tok, _ = sample_next(logits)  # plain sampling: frequencies follow softmax
    freqs = torch.bincount(tok, minlength=5).float() / len(tok)
    assert torch.allclose(freqs, p, atol=0.03)
    tok, lp = sample_next(logits[:3], temperature=0)
    assert tok.tolist() == [0, 0, 0]
    tok, lp = sample_next(logits[:1], temperature=0.5)
    assert lp.item() == pytest.approx(torch.log_softmax(logits[0] / 0.5, -1)[tok.item()].item(), rel=1e-5)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.5, "temperature": 1.3},
                                {"temperature": 0}])
def test_sample_next_stats_are_the_normaliser_and_entropy_of_the_logprobs(kw):
    torch.manual_seed(0)
    logits = torch.randn(6, 9) * 3
    torch.manual_seed(1)
    tok, lp, log_z, ent = sample_next(logits, stats=True, **kw)
    torch.manual_seed(1)
    tok2, lp2 = sample_next(logits, **kw)  # the statistics change nothing else
    assert torch.equal(tok, tok2) and torch.equal(lp, lp2)
    t = kw.get("temperature", 1.0) or 1.0  # greedy: log-probs under softmax(logits)
    logp = torch.log_softmax(logits / t, -1)
    assert torch.allclose(log_z, torch.logsumexp(logits / t, -1), atol=1e-5)
    assert torch.allclose(lp, logits.gather(-1, tok[:, None])[:, 0] / t - log_z, atol=1e-5)
    assert torch.allclose(ent, -(logp.exp() * logp).sum(-1), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plain_sampling_in_one_pass_of_ours_equals_torchs_ops(temperature, monkeypatch):
    """Plain sampling (no top-k / top-p) runs in one pass of ours (native.sample_rows) where our kernels are
    built: the same tokens at the same uniforms, and the log-probs, log Z and entropies to float rounding
    (both within 5e-5 of float64 values of up to about 70)."""
    from rlhfkit.accel import native
    from rlhfkit.rl import rollout

    if not native.native_status().startswith("on"):
        pytest.skip(f"our kernels are {native.native_status()}")
    torch.manual_seed(0)
    logits = torch.randn(400, 2048) * 3
    logits[:100] *= 4  # peaked rows: most of the mass on a few tokens
    u = torch.rand(400, 5)[:, 2:3]  # a column of the rollout's uniforms: strided
    u[0], u[1] = 0.0, 0.9999999  # the ends of the CDF
    ours = sample_next(logits, temperature, u=u, stats=True)
    assert native.sample_rows(logits, temperature, u) is not None
    monkeypatch.setattr(rollout, "sample_rows", lambda *a: None)
    theirs = sample_next(logits, temperature, u=u, stats=True)
    assert torch.equal(ours[0], theirs[0])
    x = logits.double() / temperature  # float64: the values both approximate, logits up to about 70 here
    log_z = torch.logsumexp(x, -1)
    logp = torch.log_softmax(x, -1)
    exact = (x.gather(-1, ours[0][:, None])[:, 0] - log_z, log_z, -(logp.exp() * logp).sum(-1))
    for a, b, c in zip(ours[1:], theirs[1:], exact):
        torch.testing.assert_close(a.double(), c, rtol=0, atol=5e-5)
        torch.testing.assert_close(b.double(), c, rtol=0, atol=5e-5)


def test_stop_strings_eos_and_streaming(tiny_model, tiny_tokenizer):
    prompts = ["The movie was", "I think"]
    torch.manual_seed(5)
    free = sample(tiny_model, tiny_tokenizer, prompts, n=2, max_new_tokens=24)
    # Pick a stop string that occurs in a sampled completion: a character from its middle.
    text = free[0][0]
    stop = text[len(text) // 2]
    torch.manual_seed(5)
    ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    ro = generate(tiny_model, tiny_tokenizer, ids, SamplingParams(max_new_tokens=24, stop=[stop]), n=2)
    assert stop not in ro.completions[0] and free[0][0].startswith(ro.completions[0])
    assert bool(ro.finished[0]) and int(ro.lengths[0]) < 24
    # The token that completed the stop string is the last counted one: the text up to it contains it.
    n = int(ro.lengths[0])
    assert stop in tiny_tokenizer.decode(ro.completion_ids[0, :n].tolist(), skip_special_tokens=True)
    assert stop not in tiny_tokenizer.decode(ro.completion_ids[0, :n - 1].tolist(), skip_special_tokens=True)
    # Streaming the same prompt with the same seed gives the same text, piece by piece.
    torch.manual_seed(9)
    whole = sample(tiny_model, tiny_tokenizer, ["The movie was"], n=1, max_new_tokens=20)[0][0]
    torch.manual_seed(9)
    pieces = list(stream(tiny_model, tiny_tokenizer, "The movie was", max_new_tokens=20))
    assert "".join(pieces) == whole and len(pieces) > 1


def test_eos_ends_a_completion(tiny_model, tiny_tokenizer):
    # A huge EOS logit (a bias on the LM head, which both decoders read): every completion is [EOS].
    bias = torch.zeros(len(tiny_tokenizer))
    bias[tiny_tokenizer.eos_token_id] = 100.0
    tiny_model.lm_head.bias = torch.nn.Parameter(bias)
    for backend in ("fast", "hf"):
        ro = generate(tiny_model, tiny_tokenizer, prompts_ids(tiny_tokenizer), SamplingParams(max_new_tokens=8),
                      backend=backend)
        assert ro.lengths.tolist() == [1, 1, 1, 1] and bool(ro.finished.all())
        assert ro.completions == ["", "", "", ""] and ro.completion_ids.shape[1] == 1


def test_vllm_backend_is_optional(tiny_model, tiny_tokenizer, tmp_path):
    """vllm is imported only when asked for; without it the error says what to install."""
    import importlib.util

    from rlhfkit.errors import ConfigError
    from rlhfkit.rl.rollout import Sampler

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match="needs the vllm package"):
        Sampler(tiny_model, tiny_tokenizer, "vllm", str(tmp_path))
    ro = Sampler(tiny_model, tiny_tokenizer, "auto", str(tmp_path))(prompts_ids(tiny_tokenizer)[:2],
                                                                    SamplingParams(max_new_tokens=3), 2, ["a", "b"])
    assert ro.completion_ids.shape == (4, 3) and ro.prompts == ["a", "a", "b", "b"]


def test_completion_values_and_logprobs_are_those_of_one_full_forward(tiny_gpt2, tiny_tokenizer):
    """The critic's value before completion token t and the policy's log-prob of token t, against one
    forward over the whole (left-padded) prompt + completion, read position by position."""
    from rlhfkit.models.heads import ScalarHeadModel
    from rlhfkit.rl.rollout import completion_values

    torch.manual_seed(0)
    critic = ScalarHeadModel.from_causal_lm(tiny_gpt2, init_std=0.5).eval()
    ro = generate(tiny_gpt2, tiny_tokenizer, prompts_ids(tiny_tokenizer), SamplingParams(max_new_tokens=6), n=1)
    P, C = ro.prompt_ids.size(1), ro.completion_ids.size(1)
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    mask = torch.cat([ro.prompt_mask, torch.ones_like(ro.completion_ids)], 1)
    with torch.no_grad():
        full_v = critic(ids, mask)  # (B, P + C)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full_lp = torch.log_softmax(tiny_gpt2(input_ids=ids, attention_mask=mask, position_ids=pos).logits, -1)
        values = completion_values(critic, ro)
        logprobs = completion_logprobs(tiny_gpt2, ro)[0]
    m = ro.completion_mask.bool()
    assert values.shape == (len(ro.prompts), C)
    assert torch.allclose(values[m], full_v[:, P - 1:P + C - 1][m], atol=1e-5)
    want = full_lp[:, P - 1:P + C - 1].gather(-1, ro.completion_ids[..., None])[..., 0]
    assert torch.allclose(logprobs[m], want[m], atol=1e-5)
    assert torch.allclose(logprobs[m], ro.logprobs[m], atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_gqa_llama"])
def test_no_grad_logprobs_take_our_forward_and_match_hf(which, n, request, tiny_tokenizer, monkeypatch):
    """A reference model's log-probs (no gradients, single samples or groups, left padding) run through
    fastdecode.forward_logits (the accelerated path's); they equal HF's forward (the path with gradients)
    and the sampler's."""
    from rlhfkit import accel

    model = request.getfixturevalue(which)
    ro = generate(model, tiny_tokenizer, prompts_ids(tiny_tokenizer), SamplingParams(max_new_tokens=7), n=n)
    assert not bool(ro.prompt_mask.all())  # left padding exercised
    calls, fused = [], []
    real, real_fused = fastdecode.forward_logits, fastdecode._fused_linear_gelu
    monkeypatch.setattr(fastdecode, "forward_logits", lambda m, r: calls.append(1) or real(m, r))
    monkeypatch.setattr(fastdecode, "_fused_linear_gelu", lambda *a: fused.append(1) or real_fused(*a))
    with torch.no_grad():
        lp_fast, ent_fast = accel.logprobs(model, ro, with_entropy=True)
    assert calls == [1]
    if which == "tiny_gpt2" and fastdecode._fused_gelu_ok(lp_fast):  # GPT-2's matmul + GELU fused
        assert len(fused) == 2 * model.config.n_layer  # every layer, prompt and completion passes
    lp_hf, ent_hf = accel.logprobs(model, ro, with_entropy=True)  # with gradients: HF's forward
    assert calls == [1]
    assert torch.allclose(lp_fast, lp_hf.detach(), atol=1e-5)
    assert torch.allclose(ent_fast, ent_hf, atol=1e-5)
    assert torch.allclose(lp_fast, ro.logprobs, atol=1e-5)
    if which == "tiny_gpt2":  # the fusion without our kernels: oneDNN's linear with the GELU inside
        monkeypatch.setattr(fastdecode, "native_ok", lambda *t: False)
        with torch.no_grad():
            lp_onednn, _ = accel.logprobs(model, ro, with_entropy=True)
        assert torch.allclose(lp_onednn, lp_hf.detach(), atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_gqa_llama"])
def test_reference_prompt_cache_skips_seen_prompts_and_gives_the_same_logprobs(which, request, tiny_tokenizer,
                                                                             monkeypatch):
    """A frozen model with a PromptCache: a prompt seen before (in any batch, with any padding) skips the
    prompt pass and the log-probs are those without the cache; new weights empty it; the cap holds."""
    from rlhfkit.rl.common import reference_logprobs

    model = request.getfixturevalue(which).requires_grad_(False)
    tok = tiny_tokenizer
    ro = generate(model, tok, prompts_ids(tok), SamplingParams(max_new_tokens=6), n=2)
    assert not bool(ro.prompt_mask.all())  # left padding: cached entries are re-padded per batch
    with torch.no_grad():
        want = reference_logprobs(model, model, ro, 1.0, 8)
    rows = []  # how many prompts each prompt pass runs
    real = fastdecode.GPT2Decoder._forward if which == "tiny_gpt2" else fastdecode.LlamaDecoder._forward
    owner = fastdecode.GPT2Decoder if which == "tiny_gpt2" else fastdecode.LlamaDecoder
    ids_width = ro.prompt_ids.size(1)
    monkeypatch.setattr(owner, "_forward", lambda self, ids, *a, **k: (
        rows.append(ids.size(0)) if ids.size(1) == ids_width else None) or real(self, ids, *a, **k))
    cache = fastdecode.cache_prompts(model, 64)
    with torch.no_grad():
        first = reference_logprobs(model, model, ro, 1.0, 4)  # micro-batches of 2 prompts x 2 samples
        assert (cache.hits, cache.misses) == (0, 4) and rows == [2, 2]
        # Another split, and a rollout whose prompts are a subset in another order (different padding).
        again = reference_logprobs(model, model, ro, 1.0, 8)
        sub = generate(model, tok, prompts_ids(tok)[2:0:-1], SamplingParams(max_new_tokens=6), n=1)
        sub_cached = reference_logprobs(model, model, sub, 1.0, 8)
    assert (cache.hits, cache.misses) == (6, 4) and rows == [2, 2]  # no prompt pass after the first
    assert sub.prompt_ids.size(1) < ro.prompt_ids.size(1)
    for got in (first, again):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    fastdecode.cache_prompts(model, 0)
    with torch.no_grad():
        sub_plain = reference_logprobs(model, model, sub, 1.0, 8)
    assert torch.allclose(sub_cached, sub_plain, atol=1e-5), (sub_cached - sub_plain).abs().max()

    # Changed weights: every entry is dropped, and the log-probs are the new model's.
    from rlhfkit.utils import weights

    cache = fastdecode.cache_prompts(model, 64)
    with torch.no_grad():
        reference_logprobs(model, model, ro, 1.0, 8)
        for p in model.parameters():
            p.mul_(1.1)
        weights.changed()  # a write of weights outside an optimizer step says so (utils/weights.py)
        fastdecode.cache_prompts(model, 0)
        plain_new = reference_logprobs(model, model, ro, 1.0, 8)
        fastdecode._CACHES[model] = cache
        cached_new = reference_logprobs(model, model, ro, 1.0, 8)
    assert cache.misses == 8 and cache.hits == 0
    assert torch.allclose(cached_new, plain_new, atol=1e-5)

    # The cap: entries beyond it are dropped, least recently used first.
    sizes = [sum(t.numel() * t.element_size() for t in e) for e in cache.entries.values()]
    small = fastdecode.cache_prompts(model, (sizes[2] + sizes[3]) / 2**20)
    with torch.no_grad():
        reference_logprobs(model, model, ro, 1.0, 8)
    assert len(small.entries) == 2 and small.bytes <= small.max_bytes
    assert list(small.entries) == [tuple(p) for p in prompts_ids(tok)[2:]]  # the last two prompts stay
    # A hit makes an entry the most recently used: prompt 2 (seen again) outlives prompt 3 when 0 comes in.
    with torch.no_grad():
        for i in (2, 0):
            reference_logprobs(model, model, generate(model, tok, [prompts_ids(tok)[i]], SamplingParams(
                max_new_tokens=3)), 1.0, 8)
    assert list(small.entries) == [tuple(prompts_ids(tok)[i]) for i in (2, 0)]


def test_gpt2_critic_runs_our_blocks_with_the_gradients_of_its_own_forward(tiny_gpt2, tiny_tokenizer,
                                                                           monkeypatch):
    """The accelerated completion_values of a GPT-2 critic in training (no dropout) takes fastdecode.backbone_hidden, which
    skips the last block's work at the prompt positions: values and every parameter's gradient equal those
    of the critic's own (HF) forward, with left padding."""
    from transformers import GPT2LMHeadModel

    from rlhfkit.accel import values as completion_values
    from rlhfkit.models.heads import ScalarHeadModel

    cfg = copy.deepcopy(tiny_gpt2.config)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0  # training mode without dropout
    body = GPT2LMHeadModel(cfg)
    body.load_state_dict(tiny_gpt2.state_dict())
    torch.manual_seed(0)
    critic = ScalarHeadModel.from_causal_lm(body, init_std=0.5).train()
    calls, real, supported = [], fastdecode.backbone_hidden, fastdecode.backbone_supported
    monkeypatch.setattr(fastdecode, "backbone_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))

    def values_and_grads(ro, weights):
        critic.zero_grad()
        v = completion_values(critic, ro)
        (v * weights).sum().backward()
        return v.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()}

    for prompts in (prompts_ids(tiny_tokenizer), prompts_ids(tiny_tokenizer)[1:2] * 3):  # padded, then not
        ro = generate(tiny_gpt2, tiny_tokenizer, prompts, SamplingParams(max_new_tokens=6), n=1)
        assert bool(ro.prompt_mask.all()) == (len(set(map(tuple, prompts))) == 1)
        weights = torch.randn(ro.completion_ids.shape)
        monkeypatch.setattr(fastdecode, "backbone_supported", supported)
        ours, ours_g = values_and_grads(ro, weights)
        assert len(calls) == 1
        monkeypatch.setattr(fastdecode, "backbone_supported", lambda b: False)
        hf, hf_g = values_and_grads(ro, weights)
        assert len(calls) == 1
        calls.clear()
        assert torch.allclose(ours, hf, atol=1e-5), (ours - hf).abs().max()
        for n, g in hf_g.items():  # float rounding, relative to the tensor's scale (sums of large terms)
            err = (ours_g[n] - g).abs().max()
            assert err <= 1e-5 * g.abs().max() + 1e-6, (n, err, g.abs().max())
