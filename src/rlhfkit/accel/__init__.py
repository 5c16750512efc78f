"""Which speed-ups a run uses: chosen once at setup from `run.accel`, logged in the run header.

The plain path is PyTorch and transformers only: HF's forward for sampling and training, torch's ops,
torch's allocator. The accelerated path (`run.accel: auto`, the default) adds, each where it applies:
  * kernels: our C kernels (accel/native.py: sampling, log-probs, GELU, attention, gradient norm, the
    one-call GPT-2 decode step), built at first use with the machine's C compiler;
  * fast decode: our KV-cache decoders for GPT-2 and Llama (accel/fastdecode.py), for sampling, the
    reference's log-probs and the critic's forward; GPT-2's GELU modules swapped for ours;
  * replay: a rollout's record of its sampling forward stands in for the first training forward while the
    weights are unchanged (utils/weights.py; rollout.replay_max_mb);
  * the reference's prompt cache (kl.ref_cache_mb);
  * our caching CPU allocator (run.cpu_allocator).
Every part computes what the plain path computes, to float rounding: tests/test_accel_equivalence.py
runs every trainer both ways with the production optimizer and compares losses, statistics, rewards and
final weights.

`run.accel: off` (or the environment variable RLHFKIT_ACCEL=off, which overrides the config) runs the
plain path. RLHFKIT_NATIVE=0 turns off only our compiled code (kernels and allocator).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.errors import ConfigError

MODES = ("auto", "off")


@dataclass
class Accel:
    """The parts of the accelerated path one run uses (see the module docstring)."""
    mode: str = "off"
    why: str = ""                  # where the mode came from
    kernels: bool = False
    fast_decode: bool = False      # our decoders and forwards (GPT-2 / Llama); else HF's forward
    replay_mb: float = 0.0
    ref_cache_mb: float = 0.0
    allocator: str = "system"      # run.cpu_allocator's mode to apply
    notes: dict[str, str] = field(default_factory=dict)  # part -> 'on (...)' / 'off (why)'

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def backend(self, requested: str) -> str:
        """The rollout decoder to use for rollout.backend=`requested`."""
        return "hf" if requested == "auto" and not self.fast_decode else requested

    def logprobs(self, model: Any, ro: Any, temperature: float = 1.0, with_entropy: bool = False,
                 entropy_grad: bool = False) -> tuple[Any, Any]:
        """rollout.completion_logprobs, through the parts that are on: replay, our forward, else HF's."""
        from rlhfkit.rl.rollout import completion_logprobs

        if not self.on:
            return completion_logprobs(model, ro, temperature, with_entropy, entropy_grad)
        return logprobs(model, ro, temperature, with_entropy, entropy_grad, self.fast_decode)

    def clip_and_step(self, optimizer: Any, params: list, max_norm: float) -> float:
        """rl.common.clip_and_step (clip the gradients' norm, step), with less work where on."""
        if not self.on:
            from rlhfkit.rl.common import clip_and_step as plain

            return plain(optimizer, params, max_norm)
        return clip_and_step(optimizer, params, max_norm)

    def cache_metrics(self, ref: Any) -> dict[str, float]:
        """`perf/ref_cache_hit_frac`, the share of this step's prompts the reference found in its prompt
        cache (kl.ref_cache_mb), where it has one; else nothing."""
        if ref is None or not self.ref_cache_mb:
            return {}
        from rlhfkit.accel.fastdecode import prompt_cache

        cache = prompt_cache(ref)
        return {} if cache is None else {"perf/ref_cache_hit_frac": cache.hit_frac()}

    def values(self, critic: Any, ro: Any) -> Any:
        """rollout.completion_values, through our forward for a GPT-2 critic where fast decode is on."""
        from rlhfkit.rl.rollout import completion_values

        return values(critic, ro) if self.fast_decode else completion_values(critic, ro)

    def header(self) -> str:
        """One line for the run header: the mode, and each part with why it is on or off."""
        parts = ", ".join(f"{k} {v}" for k, v in self.notes.items())
        return f"accel: {self.mode} ({self.why})" + (f": {parts}" if parts else "")


def requested_mode(config_mode: str) -> tuple[str, str]:
    """The mode to use and where it came from: RLHFKIT_ACCEL if set, else the config's run.accel."""
    env = os.environ.get("RLHFKIT_ACCEL", "").strip().lower()
    if env:
        if env not in MODES:
            raise ConfigError(f"RLHFKIT_ACCEL={env!r}: expected one of {', '.join(MODES)}")
        return env, "RLHFKIT_ACCEL"
    return config_mode, "run.accel"


def select(cfg: Any) -> Accel:
    """Choose the accelerated path's parts for a stage's config (`run`, and for the RL stages `rollout`
    and `kl`), and switch our kernels on or off for this process accordingly."""
    from rlhfkit.accel import native

    mode, source = requested_mode(cfg.run.accel)
    rollout, kl = getattr(cfg, "rollout", None), getattr(cfg, "kl", None)
    native.set_enabled(mode != "off")
    if mode == "off":
        if rollout is not None and rollout.backend == "fast":
            raise ConfigError("rollout.backend=fast is part of the accelerated path; with run.accel=off use "
                              "auto or hf")
        acc = Accel("off", f"{source}=off", allocator="system")
        acc.notes["path"] = "plain PyTorch/transformers"
        return acc
    kernels = native.lib() is not None
    if rollout is None:  # a supervised stage (DPO): our kernels only
        acc = Accel("auto", f"{source}=auto", kernels=kernels, allocator="system")
    else:
        fast = rollout.backend != "hf"
        acc = Accel("auto", f"{source}=auto", kernels=kernels, fast_decode=fast,
                    replay_mb=rollout.replay_max_mb if fast else 0.0,
                    ref_cache_mb=getattr(kl, "ref_cache_mb", 0.0) if fast else 0.0,
                    allocator=cfg.run.cpu_allocator)
    acc.notes["kernels"] = "on" if kernels else native.native_status()
    if rollout is None:
        return acc
    acc.notes["fast decode"] = "on (GPT-2, Llama)" if acc.fast_decode else "off (rollout.backend=hf)"
    acc.notes["replay"] = (f"on (up to {acc.replay_mb:g} MB)" if acc.replay_mb else
                           "off (" + ("rollout.replay_max_mb=0" if acc.fast_decode else "rollout.backend=hf") + ")")
    if kl is not None and getattr(kl, "coef", 0):
        acc.notes["ref cache"] = (f"on (up to {acc.ref_cache_mb:g} MB)" if acc.ref_cache_mb
                                  else "off (kl.ref_cache_mb=0)")
    return acc


# ---------------------------------------------------------------------------------------------------
# The accelerated parts of the rollout and of the training forwards (rl/rollout.py calls these)
# ---------------------------------------------------------------------------------------------------
def clip_and_step(optimizer: Any, params: list, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_(params, max_norm), then optimizer.step(); returns the gradient's norm
    before clipping. The same update to float rounding, with less work:
      * the norm is one pass of ours over every gradient (native.grad_norm), where torch takes one norm per
        tensor and then their norm (torch's get_total_norm where our kernels are off);
      * with torch's fused Adam / AdamW (make_optimizer's) the clip factor c goes into the step as its
        grad_scale: the step's own pass divides each gradient by 1 / c, instead of a pass of its own
        multiplying them by c first."""
    import torch

    from rlhfkit.accel import native

    grads = [p.grad for p in params if p.grad is not None]
    norm = native.grad_norm(grads)
    if norm is None:
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    coef = max_norm / (norm + 1e-6)  # as clip_grad_norm_: no clipping at coef >= 1
    fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and optimizer.defaults.get("fused")
    if fused and 0.0 < coef < 1.0 and len({g.device for g in grads}) == 1:
        optimizer.grad_scale = torch.tensor(1.0 / coef, device=grads[0].device)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        return norm
    if not coef >= 1.0:  # also a NaN norm, which clip_grad_norm_ spreads to every gradient as well
        torch._foreach_mul_(grads, coef)
    optimizer.step()
    return norm


def fast_decoder(model: Any, required: bool = False) -> Any:
    """Our KV-cache decoder for a GPT-2 or Llama model (a LoRA one samples from its merged copy,
    accel/lora.py), or None for any other (`required`: an error)."""
    from rlhfkit.accel import fastdecode, lora

    if fastdecode.supported(model):
        return fastdecode.make_fast_decoder(model)
    plain = lora.merged(model)
    if plain is not None:
        dec = fastdecode.make_fast_decoder(plain)
        dec.weights_of = model  # the copy is refreshed in place when the policy's weights change
        return dec
    if required:
        raise ConfigError(f"rollout.backend=fast supports GPT-2 and Llama models, not {type(model).__name__}; "
                          "use auto or hf")
    return None


def recording_decoder(model: Any, U: int, n: int, P: int, max_new: int, replay_mb: float, reuse: Any = None
                      ) -> Any:
    """A fast decoder that keeps a Record of its forward (fastdecode's replay) of at most replay_mb MB, or
    None where replay does not apply. `reuse`: a Record whose memory it may take."""
    from rlhfkit.accel import fastdecode

    if not replay_mb or not fastdecode.can_record(model):
        return None
    dec = fastdecode.make_fast_decoder(model)
    if fastdecode.Record.plan(dec, U, n, P, max_new, replay_mb)[2] == 0:
        return None  # not even one layer's outputs fit
    dec.record(model, U, n, P, max_new, replay_mb, reuse)
    return dec


def logprobs(model: Any, ro: Any, temperature: float = 1.0, with_entropy: bool = False,
             entropy_grad: bool = False, fast_forward: bool = True) -> tuple[Any, Any]:
    """rollout.completion_logprobs through every accelerated part that applies (fast_logprobs), else the
    plain one."""
    from rlhfkit.rl.rollout import completion_logprobs

    out = fast_logprobs(model, ro, temperature, with_entropy, entropy_grad, fast_forward)
    return out if out is not None else completion_logprobs(model, ro, temperature, with_entropy, entropy_grad)


def values(critic: Any, ro: Any) -> Any:
    """rollout.completion_values through our forward where it applies (fast_values), else the plain one."""
    from rlhfkit.rl.rollout import completion_values

    out = fast_values(critic, ro)
    return out if out is not None else completion_values(critic, ro)


def fast_logprobs(model: Any, ro: Any, temperature: float, with_entropy: bool, entropy_grad: bool,
                  fast_forward: bool = True) -> tuple[Any, Any] | None:
    """completion_logprobs' result by the accelerated path, or None where it does not apply:
      * the rollout kept a record of its sampling forward and `model` is still the model it was sampled
        from, with the same weights (utils/weights.py): the forward's matmuls are not run again
        (fastdecode.Record.replay), and neither is the log-softmax over the vocabulary: the logits are the
        sampler's, so the sampler's log Z gives the log-probabilities and its entropies are returned as
        they are (unless the entropy needs gradients);
      * no gradients (e.g. the reference's log-probs) and a GPT-2 or Llama model without dropout: our own
        forward (fastdecode.forward_logits), without HF's per-call machinery, GPT-2's GELU fused."""
    import torch

    from rlhfkit.accel import fastdecode
    from rlhfkit.rl.rollout import logprobs_of

    comp, G = ro.completion_ids, ro.group_size
    if ro.record is not None and ro.record.G == G and ro.record.usable(model):
        first, rest = ro.record.replay(ro)
        parts = [(first, comp[:, :1]), (rest, comp[:, 1:])]
        if ro.logz is None or entropy_grad:
            return logprobs_of(parts, ro, temperature, with_entropy, entropy_grad)
        from rlhfkit.models.ops import logprobs_given_logz

        at, lps = 0, []
        scale = temperature if temperature not in (0.0, 1.0) else 1.0
        for lg, x in parts:  # the temperature is applied inside (no scaled copy of the logits is kept)
            lps.append(logprobs_given_logz(lg, x, ro.logz[:, at:at + x.size(1)], scale))
            at += x.size(1)
        return torch.cat(lps, 1) * ro.completion_mask, ro.entropy if with_entropy else None
    if (fast_forward and not torch.is_grad_enabled() and fastdecode.supported(model)
            and fastdecode.dropout_free(model) and comp.size(1) > 1):
        first, rest = fastdecode.forward_logits(model, ro)
        return logprobs_of([(first, comp[:, :1]), (rest, comp[:, 1:])], ro, temperature, with_entropy,
                           entropy_grad)
    return None


def fast_values(critic: Any, ro: Any) -> Any:
    """completion_values for a GPT-2 critic through our blocks, which skip the last block's work at the
    prompt positions whose values are not used; None for any other critic."""
    import torch

    from rlhfkit.accel import fastdecode
    from rlhfkit.models.heads import ScalarHeadModel

    if not (isinstance(critic, ScalarHeadModel) and fastdecode.backbone_supported(critic.backbone)):
        return None
    C = ro.completion_ids.size(1)
    rest = ro.completion_ids[:, :-1]
    ids = torch.cat([ro.prompt_ids, rest], 1)
    mask = torch.cat([ro.prompt_mask, torch.ones_like(rest)], 1)
    h = fastdecode.backbone_hidden(critic.backbone, ids, mask, keep=C)  # positions P - 1 .. P + C - 2
    return critic.values(h) * ro.completion_mask
