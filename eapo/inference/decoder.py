"""The forward passes of batched sampling: prefill a left-padded batch, then one token per row a step.

``Qwen2Decoder`` is a lean forward for Qwen2-architecture models on CPU with a preallocated KV cache.

Why not transformers' own forward: on the tiny world's models (a 2-layer, 64-wide policy) one decode
step through it cost ~7 ms for a batch of 40, of which the arithmetic is a small part: the dynamic
cache grows by ``torch.cat`` every step (a copy of the whole cache), the attention mask is rebuilt, and
each of ~30 modules dispatches through hooks and output wrappers. Here the cache is written in place
and a step is a few dozen tensor ops. The weights are the model's own tensors (nothing is copied),
so a model swapped in between batches is read as it is, and it calls the same attention kernel
(``scaled_dot_product_attention``) on the same tensors, so its logits equal those of transformers'
SDPA forward with ``logits_to_keep=1`` (what ``TransformersDecoder`` runs) bit for bit
(tests/test_decoder.py). Anything else (another architecture, RoPE scaling, sliding windows, another
attention implementation, a dtype other than float32, a GPU) runs through ``TransformersDecoder``.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) at the last position of the prompts ``ids`` (batch, width)."""
        ...

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits after one more token per row (``ids``: (batch, 1)); finished rows advance too."""
        ...


def open_decoder(model: torch.nn.Module, mask: torch.Tensor, steps: int) -> Decoder:
    """The fastest exact decoder for ``model``; ``mask`` (batch, width) marks real prompt tokens, and
    ``steps`` bounds the calls to ``step`` after the prefill."""
    if _lean_qwen2(model):
        return Qwen2Decoder(model, mask, steps)
    return TransformersDecoder(model, mask)


class TransformersDecoder:
    """transformers' own forward and dynamic cache: any causal LM, on any device. Logits of the last
    position only where the model takes ``logits_to_keep`` (``generate``'s test): a real vocabulary's
    logits over a whole prompt batch would be gigabytes."""

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor):
        self.model, self.device = model, next(model.parameters()).device
        self.mask = mask.to(self.device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.past = None
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, self.positions)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(ids, self.positions)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.past,
            use_cache=True,
            **self.keep,
        )
        self.past = out.past_key_values
        return out.logits[:, -1, :].float().cpu()


def _lean_qwen2(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a Qwen2 causal LM on CPU that ``Qwen2Decoder`` computes as transformers does."""
    if not isinstance(model, Qwen2ForCausalLM):
        return False
    cfg, weight = model.config, next(model.parameters())
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default"}
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and cfg._attn_implementation == "sdpa"
        and rope.get("rope_type", "default") == "default"
        and all(kind == "full_attention" for kind in cfg.layer_types)
        and cfg.hidden_act == "silu"
        and not (model.training and cfg.attention_dropout)
    )


class Qwen2Decoder:
    """Qwen2's forward over a KV cache of the prompt width plus ``steps`` tokens, written in place.
    Positions count real tokens only (as ``TransformersDecoder``'s do), so each row is computed as if
    alone. The cache is allocated, not zeroed: every slot is written before it is read."""

    def __init__(self, model: Qwen2ForCausalLM, mask: torch.Tensor, steps: int):
        cfg = model.config
        self.model, self.eps = model, cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        batch, width = mask.shape
        self.length = width
        self.valid = torch.zeros((batch, width + steps), dtype=torch.bool)
        self.valid[:, :width] = mask.bool()
        shape = (batch, self.kv_heads, width + steps, self.head_dim)
        layers = len(model.model.layers)
        self.keys = [torch.empty(shape) for _ in range(layers)]
        self.values = [torch.empty(shape) for _ in range(layers)]
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.inv_freq = model.model.rotary_emb.inv_freq

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        width = ids.shape[1]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        # A padding query sees at least itself, so no row of the mask is empty: its output is never
        # read, but a NaN there would reach the cache, and a NaN value poisons a row even at zero weight.
        allowed = (causal & self.valid[:, None, :width]) | torch.eye(width, dtype=torch.bool)
        return self._forward(ids, self.positions, 0, allowed[:, None])

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        at = self.length
        self.valid[:, at] = True
        self.positions = self.positions[:, -1:] + 1
        self.length += 1
        return self._forward(ids, self.positions, at, self.valid[:, None, None, : at + 1])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, at: int, allowed: torch.Tensor) -> torch.Tensor:
        m = self.model.model
        x = m.embed_tokens.weight[ids]
        freqs = positions[..., None].float() * self.inv_freq
        cos, sin = freqs.cos().repeat(1, 1, 2)[:, None], freqs.sin().repeat(1, 1, 2)[:, None]
        end = at + ids.shape[1]
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = self._norm(x, layer.input_layernorm.weight)
            q = self._heads(F.linear(h, a.q_proj.weight, a.q_proj.bias), self.heads)
            k = self._heads(F.linear(h, a.k_proj.weight, a.k_proj.bias), self.kv_heads)
            v = self._heads(F.linear(h, a.v_proj.weight, a.v_proj.bias), self.kv_heads)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.keys[i][:, :, at:end] = k
            self.values[i][:, :, at:end] = v
            keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            if self.kv_heads != self.heads:
                keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
                values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=a.scaling)
            x = x + F.linear(out.transpose(1, 2).flatten(2), a.o_proj.weight)
            h = self._norm(x, layer.post_attention_layernorm.weight)
            gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
            x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        x = self._norm(x, m.norm.weight)  # every position, then the last, as transformers does
        return F.linear(x[:, -1:], self.model.lm_head.weight)[:, 0]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
