"""Token-level numerics shared by every stage: masking, log-prob gathering, LM loss, entropy.

Pure functions on tensors; shapes in comments use B = batch, T = time, V = vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.accel import native


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full (B, T, V) log-softmax.

    logits (B, T, V), ids (B, T) -> (B, T) float32. Without gradients, one pass of our kernels over each row
    where they are built (native.token_logprobs), else torch's logsumexp.
    """
    out = native.token_logprobs(logits, ids)  # None for logits that need gradients
    if out is not None:
        return out
    logits = logits.float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits): (B, T, V) -> (B, T)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, ids: torch.Tensor, entropy_grad: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """gather_logprobs and entropy_from_logits from one log-softmax: (B, T, V), (B, T) -> (B, T), (B, T).

    One pass over the (B, T, V) logits instead of three; the log-probabilities carry gradients, the
    entropy only if entropy_grad (e.g. for an entropy bonus)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        lp = logp if entropy_grad else logp.detach()
        entropy = -(lp.exp() * lp).sum(-1)
    return picked, entropy


class _LogprobsGivenLogZ(torch.autograd.Function):
    """logits[ids] / T - logz where logz = logsumexp(logits / T) is already known: the forward is a gather,
    the backward the usual (one-hot - softmax) * grad / T, with softmax = exp(logits / T - logz). Keeps
    the logits as given (no scaled copy of them for the backward)."""

    @staticmethod
    def forward(ctx, logits, ids, logz, temperature):
        ctx.save_for_backward(logits, ids, logz)
        ctx.inv_t = 1.0 / temperature
        picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (picked * ctx.inv_t if ctx.inv_t != 1.0 else picked) - logz

    @staticmethod
    def backward(ctx, grad):
        logits, ids, logz = ctx.saved_tensors
        fused = native.logz_backward(logits, ids, logz, grad, ctx.inv_t)  # one pass where our kernels are
        if fused is not None:
            return fused, None, None, None
        g = grad.unsqueeze(-1)
        if ctx.inv_t == 1.0:
            dlogits = torch.sub(logits, logz.unsqueeze(-1)).exp_()
        else:  # softmax = exp((logits - T logz) / T): one (rows, V) tensor either way
            g = g * ctx.inv_t
            dlogits = torch.sub(logits, logz.unsqueeze(-1) / ctx.inv_t).mul_(ctx.inv_t).exp_()
        return dlogits.mul_(-g).scatter_add_(-1, ids.unsqueeze(-1), g), None, None, None


def logprobs_given_logz(logits: torch.Tensor, ids: torch.Tensor, logz: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[ids] given logz = logsumexp(logits / temperature, -1) (e.g. from
    sampling with these very logits): (B, T, V), (B, T), (B, T) -> (B, T), differentiable in logits. Skips
    the log-softmax pass over the vocabulary; equal to gather_logprobs(logits / temperature, ids) to within
    float rounding of logz."""
    return _LogprobsGivenLogZ.apply(logits.float(), ids, logz.to(torch.float32), float(temperature))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the positions where mask is 1.

    logits (B, T, V) predict labels (B, T) position by position (the caller has already shifted).
    Returns (mean loss, number of tokens counted) so callers can weight micro-batches exactly.
    """
    per_tok = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                              reduction="none").view_as(labels)
    if mask is None:
        return per_tok.mean(), torch.tensor(labels.numel())
    n = mask.sum()
    return (per_tok * mask).sum() / n.clamp(min=1), n
