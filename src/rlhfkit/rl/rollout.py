"""Rollouts: batched sampling from any HF causal LM with a KV cache, and the policy's log-probabilities
of what it sampled.

    params = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.9, stop=["\\n"])
    ro = generate(model, tok, [tok("Hello")["input_ids"]], params, n=4)   # 4 samples of one prompt
    ro.completions, ro.completion_ids, ro.completion_mask, ro.logprobs
    sample(model, tok, ["Hello", "Hi"], n=2, max_new_tokens=16)          # -> [[str, str], [str, str]]
    for delta in stream(model, tok, "Hello", max_new_tokens=16): print(delta, end="")

A rollout is left-padded prompts (U unique prompts, each sampled n times: rows g*n .. g*n+n-1 belong to
prompt g) and right-padded completions. `completion_mask` is 1 on every sampled token up to and including
EOS or the token that completed a stop string; `logprobs` are log softmax(logits / temperature) of the
sampled tokens at sampling time, i.e. the log-probabilities of the untruncated tempered policy even when
top-k / top-p shape the sampling (as in TRL and OpenRLHF: training recomputes exactly these).

Decoders: `fast` (accel/fastdecode.py: GPT-2 and Llama, preallocated cache, minimal per-step Python), `hf`
(HF forward with its DynamicCache, any causal LM), `vllm` (GPU, imported only when asked for).
Sampling draws one uniform number per row and inverts the CDF of the (filtered) distribution, instead of
torch.multinomial's one exponential random number per vocabulary entry.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit.accel.native import sample_rows
from rlhfkit.models.ops import gather_logprobs, logprobs_and_entropy


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, rcfg: Any) -> SamplingParams:
        return cls(rcfg.max_new_tokens, rcfg.temperature, rcfg.top_p, rcfg.top_k, list(rcfg.stop))


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor   # (B, C) right-padded with the pad id
    completion_mask: torch.Tensor  # (B, C) 1 on sampled tokens that count (through EOS / stop)
    logprobs: torch.Tensor         # (B, C) log softmax(logits / T) of the sampled tokens, 0 where masked
    finished: torch.Tensor         # (B,) stopped by EOS or a stop string (False: ran into max_new_tokens)
    prompts: list[str]             # (B,) prompt texts, repeated per sample
    completions: list[str]         # (B,) decoded completions (special tokens skipped, cut at a stop string)
    group_size: int = 1            # samples per prompt
    record: Any = field(default=None, repr=False)  # fastdecode.Record of the sampling forward, if kept
    # With a record only: log Z of softmax(logits / T) at every position (the normaliser of `logprobs`)
    # and the entropy of that distribution, both (B, C) and unmasked, so that replay need not take the
    # log-softmax over the vocabulary again (completion_logprobs).
    logz: torch.Tensor | None = field(default=None, repr=False)
    entropy: torch.Tensor | None = field(default=None, repr=False)
    # Multi-turn episodes (rlhfkit.envs) only: each environment step's reward (B, C) on the last policy token
    # of the turn that earned it; None for single-turn rollouts (the score goes on the last token).
    step_rewards: torch.Tensor | None = field(default=None, repr=False)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def rows(self, idx: slice | torch.Tensor) -> Rollout:
        """A subset of rows (e.g. a micro-batch). Slices aligned to groups keep `group_size`."""
        g = 1
        if isinstance(idx, slice) and idx.step in (None, 1):
            start, stop, _ = idx.indices(len(self.prompts))
            g = self.group_size if start % self.group_size == 0 and (stop - start) % self.group_size == 0 else 1
        pick = (lambda xs: xs[idx]) if isinstance(idx, slice) else (lambda xs: [xs[i] for i in idx.tolist()])
        opt = (lambda t: None if t is None else t[idx])
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.logprobs[idx], self.finished[idx], pick(self.prompts),
                       pick(self.completions), g, None if self.record is None else self.record.rows(idx, g),
                       opt(self.logz), opt(self.entropy), opt(self.step_rewards))


# ---------------------------------------------------------------------------------------------------
# Sampling one token per row
# ---------------------------------------------------------------------------------------------------
def _expected(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Row sums of weights * values, (B, V) -> (B,), in one pass (a batched bmm is 10x slower here)."""
    return torch.linalg.vecdot(weights, values)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, u: torch.Tensor | None = None, stats: bool = False) -> tuple[torch.Tensor, ...]:
    """Sample one token per row of logits (B, V); returns (tokens (B,), logprobs (B,)), and with `stats`
    also (log Z (B,), entropy (B,)) of the distribution the log-probabilities are under.

    The log-probability is under softmax(logits / temperature) without the top-k/top-p filter (greedy:
    under softmax(logits)). `u` (B, 1) are the uniform numbers in [0, 1) to invert the CDF with; without
    them they come from the global torch RNG (so a checkpoint's RNG state resumes sampling exactly).
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        log_z = torch.logsumexp(logits, -1)
        lp = logits.gather(-1, tok[:, None])[:, 0] - log_z
        if not stats:
            return tok, lp
        return tok, lp, log_z, log_z - _expected(torch.softmax(logits, -1), logits)
    plain = not (top_k and top_k < logits.size(-1)) and top_p >= 1.0
    if plain:  # our one-pass kernel where it applies
        u = torch.rand(logits.size(0), 1, device=logits.device) if u is None else u
        out = sample_rows(logits, temperature, u)
        if out is not None:
            return out if stats else out[:2]
    scaled = logits / temperature if temperature != 1.0 else logits
    if plain:
        # Plain sampling, one exp pass: unnormalised weights, their running sum, and log Z from its total.
        peak = scaled.amax(-1, keepdim=True)
        w = (scaled - peak).exp_()  # (B, V)
        shifted_mean = _expected(w, scaled) if stats else None  # before cumsum_ overwrites w
        cdf = w.cumsum_(-1)
        total = cdf[:, -1:]
        u = (torch.rand(cdf.size(0), 1, device=cdf.device) if u is None else u) * total
        tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.size(-1) - 1)
        log_z = (peak + total.log())[:, 0]
        lp = scaled.gather(-1, tok[:, None])[:, 0] - log_z
        if not stats:
            return tok, lp
        return tok, lp, log_z, log_z - shifted_mean / total[:, 0]  # H = log Z - E_p[scaled logit]
    log_z = torch.logsumexp(scaled, -1)  # (B,)
    entropy = log_z - _expected(torch.softmax(scaled, -1), scaled) if stats else None
    filtered = scaled
    if top_k and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(filtered, dim=-1, descending=True)
        p_sorted = torch.softmax(srt, -1)
        drop_sorted = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # mass before this token already >= top_p
        filtered = filtered.masked_fill(drop_sorted.scatter(-1, idx, drop_sorted), float("-inf"))
    # Inverse-CDF sampling: first index whose cumulative probability exceeds u * total.
    cdf = torch.softmax(filtered, -1).cumsum(-1)
    u = (torch.rand(cdf.size(0), 1, device=cdf.device) if u is None else u) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.size(-1) - 1)
    lp = scaled.gather(-1, tok[:, None])[:, 0] - log_z
    return (tok, lp, log_z, entropy) if stats else (tok, lp)


# ---------------------------------------------------------------------------------------------------
# Decoders: start(prompt_ids (U, P), mask, repeat, max_new) -> logits (U*repeat, V); step(tokens) -> logits
# ---------------------------------------------------------------------------------------------------
class HFDecoder:
    """Any HF causal LM through its own forward and DynamicCache."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def start(self, ids: torch.Tensor, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.padded = not bool(mask.all())
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        kw = {"attention_mask": mask} if self.padded else {}
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1, **kw)
        if repeat > 1:
            self.cache.batch_repeat_interleave(repeat)
        self.mask = mask.repeat_interleave(repeat, 0)
        self.next_pos = mask.long().sum(-1).repeat_interleave(repeat)
        logits = out.logits[:, -1]
        return logits.repeat_interleave(repeat, 0) if repeat > 1 else logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        kw = {}
        if self.padded:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), 1)], 1)
            kw["attention_mask"] = self.mask
        out = self.model(input_ids=tokens[:, None], position_ids=self.next_pos[:, None],
                         past_key_values=self.cache, use_cache=True, **kw)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]


def make_decoder(model: torch.nn.Module, backend: str = "auto"):
    """HF's forward (backend hf), or the accelerated path's decoder where it takes the model (auto, fast)."""
    if backend in ("auto", "fast"):
        from rlhfkit import accel

        dec = accel.fast_decoder(model, required=backend == "fast")
        if dec is not None:
            return dec
    return HFDecoder(model)


def eos_ids(tok: Any, model: torch.nn.Module | None = None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the model's generation config ones."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else ([extra] if extra is not None else []))
    return sorted(ids)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(x) for x in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, x in enumerate(prompt_ids):
        if len(x):
            ids[i, P - len(x):] = torch.as_tensor(list(x))
            mask[i, P - len(x):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------------
def _decode_steps(model, tok, ids, mask, params: SamplingParams, n: int, backend: str,
                  uniforms: torch.Tensor | None = None, dec: Any = None, stats: list | None = None
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yields (t, tokens (B,), logprobs (B,), counts (B,), alive (B,)) per generated position and stops
    early once every row has finished. `counts` marks rows whose token at t counts (they were still
    generating); `alive` marks rows that go on after t. The consumer may clear entries of `alive` (stop
    strings) before asking for the next step. `uniforms` (B, max_new_tokens): the sampling randomness of
    each row and position, if given (see generate). `dec`: the decoder to use (default: make_decoder's).
    `stats`: a list to append each position's (log Z (B,), entropy (B,)) to (sample_next's stats)."""
    dec = dec or make_decoder(model, backend)
    stops = eos_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    logits = dec.start(ids, mask, n, params.max_new_tokens)
    B = logits.size(0)
    alive = torch.ones(B, dtype=torch.bool, device=logits.device)
    stop_tensor = torch.tensor(stops, device=logits.device)
    for t in range(params.max_new_tokens):
        u = None if uniforms is None else uniforms[:, t:t + 1].to(logits.device)
        if stats is None:
            nxt, lp = sample_next(logits, params.temperature, params.top_k, params.top_p, u)
        else:
            nxt, lp, log_z, ent = sample_next(logits, params.temperature, params.top_k, params.top_p, u, True)
            stats.append((log_z, ent))
        counts = alive.clone()
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        alive &= ~torch.isin(nxt, stop_tensor)
        yield t, nxt, lp, counts, alive  # the consumer may clear more rows of `alive` (stop strings)
        if not bool(alive.any()) or t == params.max_new_tokens - 1:
            return
        logits = dec.step(nxt)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _generate(model, tok, prompt_ids, params, n, backend, uniforms=None, replay_mb: float = 0, reuse=None,
              decoder=None):
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad(prompt_ids, pad)
    ids, mask = ids.to(device), mask.to(device)
    dec = None
    if replay_mb and backend in ("auto", "fast"):  # the accelerated path keeps a record of this forward
        from rlhfkit import accel

        dec = accel.recording_decoder(model, ids.size(0), n, ids.size(1), params.max_new_tokens, replay_mb, reuse)
    with torch.inference_mode():  # a record's buffers were made outside it: they may feed autograd later
        return _decode_all(model, tok, ids, mask, params, n, backend, uniforms, dec, decoder)


def _decode_all(model, tok, ids, mask, params, n, backend, uniforms, dec, decoder=None):
    was_training = model.training
    model.eval()
    cols_tok, cols_lp, cols_mask = [], [], []
    stats = None if dec is None else []  # a record's rollout keeps log Z and entropies for replay
    try:
        for t, nxt, lp, counts, alive in _decode_steps(model, tok, ids, mask, params, n, backend, uniforms,
                                                       dec or decoder, stats):
            cols_tok.append(nxt)
            cols_lp.append(torch.where(counts, lp, torch.zeros_like(lp)))
            cols_mask.append(counts)
            if params.stop:
                # Decode the tail of each live row and end it if a stop string appeared.
                seq = torch.stack(cols_tok, 1)
                for b in alive.nonzero()[:, 0].tolist():
                    text = tok.decode(seq[b, max(0, t - 16):t + 1].tolist(), skip_special_tokens=True)
                    if _cut_at_stop(text, params.stop)[1]:
                        alive[b] = False
    finally:
        model.train(was_training)
    comp = torch.stack(cols_tok, 1)
    cmask = torch.stack(cols_mask, 1).long()
    logprobs = torch.stack(cols_lp, 1)
    finished = ~alive  # ended by EOS or a stop string
    if dec is None:
        return ids, mask, comp, cmask, logprobs, finished, None
    logz, ent = (torch.stack(c, 1) for c in zip(*stats))
    return ids, mask, comp, cmask, logprobs, finished, (dec.rec, logz, ent)


def generate(model: torch.nn.Module, tok: Any, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
             n: int = 1, backend: str = "auto", prompts: Sequence[str] | None = None,
             uniforms: torch.Tensor | None = None, replay_mb: float = 0, reuse: Any = None,
             decoder: Any = None) -> Rollout:
    """Sample n completions for each prompt (token ids, any lengths). Runs in inference mode and eval mode
    (no dropout), and restores the model's mode.

    `uniforms` (len(prompt_ids) * n, max_new_tokens) in [0, 1): the random number each row uses at each
    position. The RL loops draw them for the whole global batch from a generator seeded by (seed, step), so
    a completion depends only on its global row, not on how the batch is split over processes.

    `replay_mb` > 0: keep a record of the sampling forward (fastdecode.Record, up to that many MB) so that
    completion_logprobs can replay it instead of running the forward's matmuls again (GPT-2 and Llama
    policies trained whole and without dropout; see fastdecode). `reuse`: an earlier rollout's record, no
    longer needed, whose memory the new one takes over (it stops being usable). `decoder`: the decoder to
    sample with (make_decoder's, perhaps wrapped: the server's takes turns with other requests between
    steps); ignored when a record is kept."""
    if backend == "vllm":
        raise ValueError("the vllm backend samples through VLLMEngine.generate (it owns its own weights)")
    ids, mask, comp, cmask, logprobs, finished, kept = _generate(model, tok, prompt_ids, params, n, backend,
                                                                 uniforms, replay_mb, reuse, decoder)
    record, logz, ent = kept or (None, None, None)
    if prompts is None:
        prompts = tok.batch_decode([list(p) for p in prompt_ids], skip_special_tokens=True)
    texts = []
    for b in range(comp.size(0)):
        text = tok.decode(comp[b, :int(cmask[b].sum())].tolist(), skip_special_tokens=True)
        texts.append(_cut_at_stop(text, params.stop)[0] if params.stop else text)
    # Clone out of inference mode: these tensors feed autograd later (embedding lookups save their indices).
    return Rollout(ids.repeat_interleave(n, 0).clone(), mask.repeat_interleave(n, 0).clone(), comp.clone(),
                   cmask.clone(), logprobs.clone(), finished.clone(), [p for p in prompts for _ in range(n)],
                   texts, n, record, None if logz is None else logz.clone(), None if ent is None else ent.clone())


def sample(model: torch.nn.Module, tok: Any, prompts: Sequence[str], n: int = 1, backend: str = "auto",
           add_special_tokens: bool = True, **params: Any) -> list[list[str]]:
    """n completions (texts) for each prompt text: for evaluation, best-of-n and serving."""
    sp = SamplingParams(**params)
    ids = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    ro = generate(model, tok, ids, sp, n, backend, prompts)
    return [ro.completions[i * n:(i + 1) * n] for i in range(len(prompts))]


@torch.inference_mode()
def stream(model: torch.nn.Module, tok: Any, prompt: str | Sequence[int], backend: str = "auto",
           add_special_tokens: bool = True, **params: Any) -> Iterator[str]:
    """Yield the completion of one prompt as text deltas, one decode step at a time (for a server).

    A delta is held back while the text ends in an incomplete UTF-8 character; stop strings end the
    stream before the stop string is emitted."""
    sp = SamplingParams(**params)
    ids = tok(prompt, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(prompt, str) else prompt
    device = next(model.parameters()).device
    x = torch.as_tensor([list(ids)], device=device)
    was_training = model.training
    model.eval()
    toks: list[int] = []
    sent = ""
    hold = max((len(s) for s in sp.stop), default=1) - 1  # chars that might start a stop string
    try:
        for t, nxt, lp, counts, alive in _decode_steps(model, tok, x, torch.ones_like(x), sp, 1, backend):
            if not bool(counts[0]):
                break
            toks.append(int(nxt[0]))
            text = tok.decode(toks, skip_special_tokens=True)
            text, hit = _cut_at_stop(text, sp.stop) if sp.stop else (text, False)
            safe = len(text) if (hit or not bool(alive[0])) else max(len(sent), len(text) - hold)
            if text.endswith("\ufffd") and not hit:
                safe = min(safe, len(text) - 1)
            if safe > len(sent):
                yield text[len(sent):safe]
                sent = text[:safe]
            if hit:
                break
        else:
            text = tok.decode(toks, skip_special_tokens=True)
            if len(text) > len(sent):
                yield text[len(sent):]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------
# Training side: the policy's log-probabilities of a rollout, with gradients
# ---------------------------------------------------------------------------------------------------
def completion_logprobs(model: torch.nn.Module, ro: Rollout, temperature: float = 1.0,
                        with_entropy: bool = False, entropy_grad: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T) of each completion token under `model`: (B, C), differentiable; with
    `with_entropy` also the entropy of the same distributions (B, C): detached, or with gradients if
    `entropy_grad` (an entropy bonus). HF's forward, any causal LM. Work saved, all exact:
      * logits only at the C positions that predict completion tokens (not at the prompt);
      * no attention mask when no prompt is padded (right padding after EOS is never attended: causal);
      * a group of n completions of one prompt runs the prompt once: its KV cache (with gradients) is
        repeated n times and the completions attend to it, like the rollout's own prefill (for 16-token
        prompts, 32-token completions and groups of 4, 25% fewer tokens through the network).
    The accelerated path (rlhfkit.accel.Accel.logprobs) computes the same from a rollout's record or with
    our own forward where those apply, and calls this otherwise.
    """
    comp, G = ro.completion_ids, ro.group_size
    padded = not bool(ro.prompt_mask.all())
    pos_c = ro.prompt_mask.long().sum(-1, keepdim=True) + torch.arange(comp.size(1) - 1, device=comp.device)
    # A model training with gradient checkpointing refuses a KV cache (HF turns use_cache off), so it
    # runs prompt + completion in one forward instead.
    checkpointed = model.training and any(getattr(m, "gradient_checkpointing", False) is True
                                          for m in model.modules())
    if G > 1 and comp.size(1) > 1 and not checkpointed:
        from transformers import DynamicCache

        cache = DynamicCache()
        u_ids, u_mask = ro.prompt_ids[::G], ro.prompt_mask[::G]
        kw = {"attention_mask": u_mask} if padded else {}
        first = model(input_ids=u_ids, position_ids=(u_mask.long().cumsum(-1) - 1).clamp(min=0),
                      past_key_values=cache, use_cache=True, logits_to_keep=1, **kw).logits  # (U, 1, V)
        cache.batch_repeat_interleave(G)
        if padded:
            kw = {"attention_mask": torch.cat([ro.prompt_mask, torch.ones_like(comp[:, :-1])], 1)}
        rest = model(input_ids=comp[:, :-1], position_ids=pos_c, past_key_values=cache, use_cache=True,
                     **kw).logits  # (B, C-1, V)
        # Scored in two parts (no (B, C, V) concatenation): the first token from the prompt's last position.
        parts = [(first.repeat_interleave(G, 0), comp[:, :1]), (rest, comp[:, 1:])]
    else:
        # The last completion token predicts nothing we sampled: it is not fed.
        ids = torch.cat([ro.prompt_ids, comp[:, :-1]], 1)
        kw = {}
        if padded:
            kw["attention_mask"] = torch.cat([ro.prompt_mask, torch.ones_like(comp[:, :-1])], 1)
            kw["position_ids"] = (kw["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, logits_to_keep=comp.size(1), use_cache=False, **kw).logits
        parts = [(logits, comp)]
    return logprobs_of(parts, ro, temperature, with_entropy, entropy_grad)


def logprobs_of(parts, ro: Rollout, temperature: float, with_entropy: bool, entropy_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """completion_logprobs' result from (logits (B, c, V), tokens (B, c)) pieces covering the completion."""
    if temperature not in (0.0, 1.0):
        parts = [(lg / temperature, x) for lg, x in parts]
    if not (with_entropy or entropy_grad):
        return torch.cat([gather_logprobs(lg, x) for lg, x in parts], 1) * ro.completion_mask, None
    both = [logprobs_and_entropy(lg, x, entropy_grad) for lg, x in parts]  # one log-softmax for both
    logprobs = torch.cat([lp for lp, _ in both], 1) * ro.completion_mask
    return logprobs, torch.cat([e for _, e in both], 1)


def completion_values(critic: torch.nn.Module, ro: Rollout) -> torch.Tensor:
    """The critic's value before each completion token: V(prompt + completion[:t]), (B, C), through its
    own forward (a ScalarHeadModel handles left-padding positions)."""
    P = ro.prompt_ids.size(1)
    rest = ro.completion_ids[:, :-1]  # the value after the last token is never used: it is not fed
    ids = torch.cat([ro.prompt_ids, rest], 1)
    mask = torch.cat([ro.prompt_mask, torch.ones_like(rest)], 1)
    values = critic(ids, mask)  # (B, P + C - 1)
    return values[:, P - 1:] * ro.completion_mask


class Sampler:
    """The rollout backend of an RL loop: our decoders reading the training model itself (fast / hf /
    auto), or a vLLM engine that holds its own copy of the weights, synced from the policy before every
    rollout (so a resumed run samples from the resumed weights too)."""

    def __init__(self, model: torch.nn.Module, tok: Any, backend: str, model_dir: str, seed: int = 0,
                 replay_mb: float = 0) -> None:
        self.model, self.tok, self.backend, self.replay_mb = model, tok, backend, replay_mb
        self.record = None  # the last rollout's: the next one takes over its memory (a step is over by then)
        self.engine = VLLMEngine(model_dir, seed=seed) if backend == "vllm" else None

    def __call__(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, n: int,
                 prompts: Sequence[str], uniforms: torch.Tensor | None = None) -> Rollout:
        """`uniforms` fix our decoders' randomness per row (see generate); vLLM draws its own."""
        if self.engine is None:
            old, self.record = self.record, None
            ro = generate(self.model, self.tok, prompt_ids, params, n, self.backend, prompts, uniforms,
                          self.replay_mb, old)
            if old is not None:
                old.release()  # if the new rollout did not take its memory over
            self.record = ro.record
            return ro
        self.engine.sync(self.model)
        ro = self.engine.generate(self.tok, prompt_ids, params, n, prompts)
        device = next(self.model.parameters()).device
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "finished"):
            setattr(ro, name, getattr(ro, name).to(device))
        return ro


# ---------------------------------------------------------------------------------------------------
# vLLM (GPU only, optional)
# ---------------------------------------------------------------------------------------------------
class VLLMEngine:
    """Sampling through vLLM, for GPUs. vllm is imported here and only here.

    The engine holds its own copy of the weights: call `sync(model)` after each optimizer step. Log-probs
    come from vLLM (computed by its kernels; they differ from the training forward by rounding).
    Not exercised by the test suite (no GPU there); the fast/hf backends are.
    """

    def __init__(self, model_dir: str, gpu_memory_utilization: float = 0.3, seed: int = 0) -> None:
        try:
            from vllm import LLM
        except ImportError:
            from rlhfkit.errors import ConfigError

            raise ConfigError("rollout.backend=vllm needs the vllm package (pip install vllm) and a GPU") from None
        self.llm = LLM(model=model_dir, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                       enable_prefix_caching=True)

    def sync(self, model: torch.nn.Module) -> None:
        """Copy the policy's weights into the engine (HF parameter names, as TRL's colocate mode does)."""
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        try:  # vLLM's V1 engine: run load_weights inside the worker
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights))
        except (AttributeError, TypeError):
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            runner.model.load_weights(iter(weights))
        self.llm.reset_prefix_cache()

    def generate(self, tok: Any, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, n: int,
                 prompts: Sequence[str]) -> Rollout:
        from vllm import SamplingParams as VSP
        from vllm import TokensPrompt

        sp = VSP(n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                 max_tokens=params.max_new_tokens, stop=params.stop or None, logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sp, use_tqdm=False)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, mask = left_pad(prompt_ids, pad)
        rows = [(o, c) for o in outs for c in o.outputs]
        C = max(1, max(len(c.token_ids) for _, c in rows))
        comp = torch.full((len(rows), C), pad, dtype=torch.long)
        cmask = torch.zeros((len(rows), C), dtype=torch.long)
        lps = torch.zeros((len(rows), C))
        for b, (_, c) in enumerate(rows):
            k = len(c.token_ids)
            comp[b, :k] = torch.as_tensor(c.token_ids)
            cmask[b, :k] = 1
            lps[b, :k] = torch.as_tensor([next(iter(d.values())).logprob for d in c.logprobs])
        finished = torch.tensor([c.finish_reason == "stop" for _, c in rows])
        return Rollout(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), comp, cmask, lps, finished,
                       [p for p in prompts for _ in range(n)], [c.text for _, c in rows], n)
