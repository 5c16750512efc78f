"""Our own KV-cache decoders for GPT-2 and Llama-architecture models: the decode step with as little Python
per token as we can manage.

They read the weights of an ordinary HF model (`GPT2LMHeadModel`, `LlamaForCausalLM`) in place, so they
always decode the current policy, with no copy or weight sync. Why not HF's forward: at the batch sizes of
RL on a CPU a decode step's matmuls take a few milliseconds, and HF's per-call machinery (cache objects,
mask building, attention dispatch, output dataclasses) is of the same order. On the trl-peer workload the
rollouts run at about twice the tokens/s of HF's generate() (docs/benchmarks.md). Any other architecture
decodes through HF's forward (rollout.HFDecoder).

Both decoders share one shape: `start()` runs the prompts once (U unique prompts, each then repeated
`repeat` times for a group of samples, so a prompt's prefill is computed once per group), and `step()`
feeds one token per row and returns the next logits. The cache is preallocated, (layers, B, kv_heads,
prompt + max_new, head_dim), written in place. Left padding: pad keys are masked, positions count real
tokens only (as HF does), and a pad query attends to itself so no row of the softmax is empty.

Equivalence with HF's forward is tested (tests/test_rollout.py); the logits agree to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def supported(model: torch.nn.Module) -> bool:
    """True if `model` is a plain GPT-2 or Llama causal LM whose forward we reproduce exactly."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        return (cfg.activation_function in _GELU and getattr(cfg, "scale_attn_weights", True)
                and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
                and not getattr(cfg, "reorder_and_upcast_attn", False)
                and not getattr(cfg, "add_cross_attention", False))
    if name == "LlamaForCausalLM":
        return (cfg.hidden_act == "silu" and getattr(cfg, "pretraining_tp", 1) == 1
                and not getattr(cfg, "mlp_bias", False))
    return False


class _Base:
    """Cache bookkeeping shared by both architectures."""

    def __init__(self, n_layer: int, n_kv: int, head_dim: int) -> None:
        self.L, self.Hkv, self.hd = n_layer, n_kv, head_dim

    def _alloc(self, B: int, T: int, like: torch.Tensor) -> None:
        shape = (self.L, B, self.Hkv, T, self.hd)
        self.K = like.new_empty(shape)
        self.V = like.new_empty(shape)

    def _prompt_masks(self, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor | None:
        """Positions (U, P), and the key mask over the whole cache (B, P + max_new) if there is padding."""
        self.pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (U, P) positions of real tokens
        self.next_pos = mask.long().sum(-1).repeat_interleave(repeat)  # (B,) position of the next token
        self.t = mask.size(1)  # cache slot of the next token
        if bool(mask.all()):
            self.key_ok = None
            return None
        B = mask.size(0) * repeat
        key_ok = torch.ones(B, mask.size(1) + max_new, dtype=torch.bool, device=mask.device)
        key_ok[:, :mask.size(1)] = mask.bool().repeat_interleave(repeat, 0)
        self.key_ok = key_ok
        # Prefill mask (U, 1, P, P): causal, real keys only, and the diagonal (pad queries see themselves).
        P = mask.size(1)
        causal = torch.ones(P, P, dtype=torch.bool, device=mask.device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=mask.device)
        return ((causal & mask.bool()[:, None, :]) | eye)[:, None]

    def _store_prompt_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, repeat: int) -> None:
        P = k.size(2)
        self.K[i, :, :, :P] = k.repeat_interleave(repeat, 0) if repeat > 1 else k
        self.V[i, :, :, :P] = v.repeat_interleave(repeat, 0) if repeat > 1 else v

    def _attend_step(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k, v (B, Hkv, 1, hd) into slot t and attend over slots 0..t."""
        t = self.t
        self.K[i, :, :, t] = k[:, :, 0]
        self.V[i, :, :, t] = v[:, :, 0]
        mask = None if self.key_ok is None else self.key_ok[:, None, None, :t + 1]
        return F.scaled_dot_product_attention(q, self.K[i, :, :, :t + 1], self.V[i, :, :, :t + 1],
                                              attn_mask=mask, enable_gqa=self.gqa)


class GPT2Decoder(_Base):
    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        super().__init__(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head)
        self.tr, self.lm_head, self.H, self.D = model.transformer, model.lm_head, cfg.n_head, cfg.n_embd
        self.gelu = _GELU[cfg.activation_function]
        self.gqa = False

    def _blocks(self, x: torch.Tensor, attend) -> torch.Tensor:
        """x (N, n, D) through every block; attend(i, q, k, v) does the attention of layer i."""
        N, n, D = x.shape
        for i, blk in enumerate(self.tr.h):
            a = blk.attn
            h = F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            qkv = torch.addmm(a.c_attn.bias, h.view(-1, D), a.c_attn.weight)  # Conv1D: weight is (in, out)
            q, k, v = qkv.view(N, n, 3, self.H, self.hd).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, n, hd)
            o = attend(i, q, k, v).transpose(1, 2).reshape(N * n, D)
            x = x + torch.addmm(a.c_proj.bias, o, a.c_proj.weight).view(N, n, D)
            h = F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            h = F.gelu(torch.addmm(blk.mlp.c_fc.bias, h.view(-1, D), blk.mlp.c_fc.weight), approximate=self.gelu)
            x = x + torch.addmm(blk.mlp.c_proj.bias, h, blk.mlp.c_proj.weight).view(N, n, D)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        f = self.tr.ln_f
        return F.linear(F.layer_norm(x, (self.D,), f.weight, f.bias, f.eps), self.lm_head.weight)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor:
        U, P = ids.shape
        self._alloc(U * repeat, P + max_new, self.tr.wte.weight)
        pmask = self._prompt_masks(mask, repeat, max_new)
        x = self.tr.wte(ids) + self.tr.wpe(self.pos)

        def attend(i, q, k, v):
            self._store_prompt_kv(i, k, v, repeat)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=pmask, is_causal=pmask is None)

        x = self._blocks(x, attend)[:, -1]  # (U, D): the last prompt position predicts the first token
        return self._logits(x).repeat_interleave(repeat, 0) if repeat > 1 else self._logits(x)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (self.tr.wte(tokens) + self.tr.wpe(self.next_pos))[:, None]  # (B, 1, D)
        x = self._blocks(x, self._attend_step)[:, 0]
        self.t += 1
        self.next_pos = self.next_pos + 1
        return self._logits(x)


class LlamaDecoder(_Base):
    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        super().__init__(cfg.num_hidden_layers, cfg.num_key_value_heads, hd)
        self.m, self.lm_head, self.H, self.D = model.model, model.lm_head, cfg.num_attention_heads, cfg.hidden_size
        self.gqa = self.Hkv != self.H

    def _blocks(self, x: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        N, n, D = x.shape
        cos, sin = self.m.rotary_emb(x, pos)  # HF's own rotary (handles every rope scaling type)
        for i, layer in enumerate(self.m.layers):
            a, mlp = layer.self_attn, layer.mlp
            h = F.rms_norm(x, (D,), layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(N, n, self.H, self.hd).transpose(1, 2)
            k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(N, n, self.Hkv, self.hd).transpose(1, 2)
            v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(N, n, self.Hkv, self.hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = attend(i, q, k, v).transpose(1, 2).reshape(N, n, self.H * self.hd)
            x = x + F.linear(o, a.o_proj.weight, a.o_proj.bias)
            h = F.rms_norm(x, (D,), layer.post_attention_layernorm.weight,
                           layer.post_attention_layernorm.variance_epsilon)
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        nrm = self.m.norm
        return F.linear(F.rms_norm(x, (self.D,), nrm.weight, nrm.variance_epsilon), self.lm_head.weight,
                        self.lm_head.bias)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, repeat: int, max_new: int) -> torch.Tensor:
        U, P = ids.shape
        self._alloc(U * repeat, P + max_new, self.m.embed_tokens.weight)
        pmask = self._prompt_masks(mask, repeat, max_new)

        def attend(i, q, k, v):
            self._store_prompt_kv(i, k, v, repeat)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=pmask, is_causal=pmask is None,
                                                  enable_gqa=self.gqa)

        x = self._blocks(self.m.embed_tokens(ids), self.pos, attend)[:, -1]
        logits = self._logits(x)
        return logits.repeat_interleave(repeat, 0) if repeat > 1 else logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.m.embed_tokens(tokens)[:, None]
        x = self._blocks(x, self.next_pos[:, None], self._attend_step)[:, 0]
        self.t += 1
        self.next_pos = self.next_pos + 1
        return self._logits(x)


def make_fast_decoder(model: torch.nn.Module):
    return GPT2Decoder(model) if type(model).__name__ == "GPT2LMHeadModel" else LlamaDecoder(model)
