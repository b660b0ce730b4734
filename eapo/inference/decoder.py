"""The forward passes of the running batch: prompts join it (a prefill), every row advances one token a
step, finished rows leave.

``Qwen2Decoder`` is a lean forward for Qwen2-architecture models on CPU over a slot KV cache, so rows
join and leave between steps (continuous batching): a turn that arrives mid-batch starts at the next
token, and a finished row costs nothing more. Measured by ``benchmarks/batching.py`` against the
batch-at-a-time sampler it replaced.

Why not transformers' own forward: on the tiny world's models (a 2-layer, 64-wide policy) one decode
step through it cost ~7 ms for a batch of 40, of which the arithmetic is a small part: the dynamic
cache grows by ``torch.cat`` every step (a copy of the whole cache), the attention mask is rebuilt, and
each of ~30 modules dispatches through hooks and output wrappers. Here the cache is written in place
and a step is a few dozen tensor ops, on weights partly fused (copied) when the decoder opens and partly
read from the model, so a model must not change in place while a decoder is open on it (none does: the
batcher opens one per model it is given, and new weights come as a new model). It calls the same
attention kernel (``scaled_dot_product_attention``) on the same values, so its logits equal those of
transformers' SDPA forward with ``logits_to_keep=1`` (what ``TransformersDecoder`` runs) up to rounding:
a row attends over the batch's widest row, masked, where transformers' rows are left-padded, and the sums
round differently (≤ 1e-5, tests/test_decoder.py). Anything else (another architecture, RoPE scaling,
sliding windows, another attention implementation, a dtype other than float32, a GPU) runs through
``TransformersDecoder``, whose cache takes new rows only when its batch has drained.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM


class Decoder(Protocol):
    """The running batch's forward passes. Rows are requests, in the caller's order: ``add`` appends
    rows, ``step`` advances every row by one token, ``keep`` drops finished rows and reorders the rest."""

    joins: bool  # whether rows may be added while others are running

    def add(self, prompts: list[list[int]], budgets: list[int]) -> torch.Tensor:
        """Appends one row per prompt, which will be fed up to ``budgets`` more tokens; returns the
        logits (rows, vocab) at each prompt's last position."""
        ...

    def step(self, ids: list[int]) -> torch.Tensor:
        """Logits (rows, vocab) after one more token per row."""
        ...

    def keep(self, rows: list[int]) -> None:
        """Keeps only ``rows``, row ``j`` now being the former row ``rows[j]``."""
        ...


def open_decoder(model: torch.nn.Module, max_rows: int, pad_id: int) -> Decoder:
    """The fastest decoder for ``model``: ``Qwen2Decoder`` where it computes what transformers does."""
    if _lean_qwen2(model):
        return Qwen2Decoder(model, max_rows)
    return TransformersDecoder(model, pad_id)


class TransformersDecoder:
    """transformers' own forward and dynamic cache: any causal LM, on any device. Its cache cannot take
    rows mid-batch, so a batch runs to its end (finished rows advance too, their output unread). Logits
    of the last position only where the model takes ``logits_to_keep`` (``generate``'s test): a real
    vocabulary's logits over a whole prompt batch would be gigabytes."""

    joins = False

    def __init__(self, model: torch.nn.Module, pad_id: int):
        self.model, self.pad_id, self.device = model, pad_id, next(model.parameters()).device
        self.keep_logits = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )
        self.live: list[int] = []  # the cache's row of each running row

    def add(self, prompts: list[list[int]], budgets: list[int]) -> torch.Tensor:
        if self.live:
            raise RuntimeError("TransformersDecoder cannot add rows to a running batch")
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):  # left-padded: every row's last token is the last column
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            self.mask[row, width - len(prompt) :] = 1
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.past = None
        logits = self._forward(ids, self.positions)
        self.live = list(range(len(prompts)))
        return logits

    def step(self, ids: list[int]) -> torch.Tensor:
        fed = torch.full((len(self.mask), 1), self.pad_id, dtype=torch.long)
        fed[self.live, 0] = torch.tensor(ids)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(fed, self.positions)[self.live]

    def keep(self, rows: list[int]) -> None:
        self.live = [self.live[r] for r in rows]
        if not self.live:
            self.past = None  # the batch is over: free its cache

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.past,
            use_cache=True,
            **self.keep_logits,
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


class _Layer(NamedTuple):
    """One decoder layer's weights, fused so that a step is a few dozen tensor ops."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor  # q, k, v, then q and k rotated by half and zero rows for v (RoPE as one product)
    qkv_bias: torch.Tensor
    o_t: torch.Tensor  # o_proj, transposed for addmm
    scale: float
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    down_t: torch.Tensor


class Qwen2Decoder:
    """Qwen2's forward over a slot KV cache: row ``r`` holds its request's tokens in columns
    ``0 … lengths[r]-1``, positions counting from 0, so each row is computed as if alone (up to
    rounding) and rows join and leave between steps (continuous batching). Columns past a row's length
    hold finite leftovers (the cache starts zeroed) that the mask hides: a NaN there would poison the
    row even at zero weight.

    On these models a step costs its ops' dispatch more than their arithmetic, so the weights are fused
    once, when the decoder opens: q, k and v are one product, and in a step so is their rotation, since RoPE's
    ``rotate_half`` is a signed permutation of each head's output rows (``_rotated_rows``), which a
    product with permuted weights computes exactly (a prefill, whose cost is its arithmetic, rotates
    after the product); gate and up are one product; a layer's keys and values share one cache tensor,
    written once a step. The copies hold about 70% of a layer's weights again: nothing on the tiny
    world, about 1 GB for a 0.5B-parameter checkpoint in float32 (vLLM is the engine for those).
    Measured in ``docs/decisions.md`` ("A hand-written forward …")."""

    joins = True

    def __init__(self, model: Qwen2ForCausalLM, max_rows: int, columns: int = 256):
        cfg = model.config
        self.model, self.eps = model, cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.rows, self.max_rows = 0, max_rows
        self.lengths = torch.zeros(max_rows, dtype=torch.long)
        self.inv_freq = model.model.rotary_emb.inv_freq
        self.layers = [self._fuse(layer) for layer in model.model.layers]
        shape = (max_rows, 2 * self.kv_heads, columns, self.head_dim)  # keys, then values
        self.cache = [torch.zeros(shape) for _ in self.layers]
        self._rope_tables(columns)

    @torch.no_grad()
    def _fuse(self, layer: torch.nn.Module) -> _Layer:
        a, mlp, hd = layer.self_attn, layer.mlp, self.head_dim

        def bias(proj: torch.nn.Linear) -> torch.Tensor:
            return proj.bias if proj.bias is not None else proj.weight.new_zeros(proj.out_features)

        q, k, v = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        qb, kb, vb = bias(a.q_proj), bias(a.k_proj), bias(a.v_proj)
        rq, rk = _rotated_rows(q, hd), _rotated_rows(k, hd)
        return _Layer(
            attn_norm=layer.input_layernorm.weight,
            qkv=torch.cat([q, k, v, rq, rk, torch.zeros_like(v)]),
            qkv_bias=torch.cat([qb, kb, vb, _rotated_rows(qb, hd), _rotated_rows(kb, hd), torch.zeros_like(vb)]),
            o_t=a.o_proj.weight.t(),
            scale=a.scaling,
            mlp_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down_t=mlp.down_proj.weight.t(),
        )

    def _rope_tables(self, columns: int) -> None:
        """cos and sin by position for the fused q, k, v columns (v: cos 1, sin 0, so it passes unrotated)."""
        freqs = torch.arange(columns)[:, None].float() * self.inv_freq
        cos, sin = freqs.cos().repeat(1, 2), freqs.sin().repeat(1, 2)
        rotated_heads, plain = self.heads + self.kv_heads, (columns, self.kv_heads * self.head_dim)
        self.cos = torch.cat([cos.repeat(1, rotated_heads), torch.ones(plain)], dim=1)
        self.sin = torch.cat([sin.repeat(1, rotated_heads), torch.zeros(plain)], dim=1)
        half = self.head_dim // 2
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=1).repeat(1, rotated_heads)  # prefill q, k

    def add(self, prompts: list[list[int]], budgets: list[int]) -> torch.Tensor:
        first, count = self.rows, len(prompts)
        if first + count > self.max_rows:
            raise ValueError(f"{first + count} rows exceed this decoder's {self.max_rows}")
        lengths = torch.tensor([len(p) for p in prompts])
        self._reserve(max(len(p) + b for p, b in zip(prompts, budgets, strict=True)))
        width = int(lengths.max())
        ids = torch.zeros((count, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # right-padded: every row starts at column 0
            ids[row, : len(prompt)] = torch.tensor(prompt)
        real = torch.arange(width) < lengths[:, None]
        # A padding query sees at least itself, so no row of the mask is empty (its output is never read).
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (causal & real[:, None]) | torch.eye(width, dtype=torch.bool)
        positions = torch.arange(width).expand(count, width)
        x = self._forward(ids, positions, slice(first, first + count), None, width, allowed[:, None])
        self.lengths[first : first + count] = lengths
        self.rows += count
        return self._logits(x[torch.arange(count), lengths - 1])

    def step(self, ids: list[int]) -> torch.Tensor:
        n = self.rows
        at = self.lengths[:n]
        end = int(at.max()) + 1
        allowed = torch.arange(end) <= at[:, None]
        x = self._forward(torch.tensor(ids)[:, None], at[:, None], slice(0, n), at, end, allowed[:, None, None])
        self.lengths[:n] += 1
        return self._logits(x[:, 0])

    def keep(self, rows: list[int]) -> None:
        moved = [(new, old) for new, old in enumerate(rows) if new != old]
        if moved:
            new, old = (list(t) for t in zip(*moved, strict=True))
            for cache in self.cache:
                cache[new] = cache[old]  # reads every moved row before writing any
            self.lengths[new] = self.lengths[old]
        self.rows = len(rows)

    def _reserve(self, columns: int) -> None:
        have = self.cache[0].shape[2]
        if columns > have:
            grow = max(columns, 2 * have) - have
            self.cache = [F.pad(c, (0, 0, 0, grow)) for c in self.cache]  # the column dimension, zero-filled
            self._rope_tables(have + grow)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: slice,
        at: torch.Tensor | None,
        end: int,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """The final hidden states of ``ids`` for cache ``rows``: a prefill from column 0 (``at`` None),
        or one token per row at column ``at[r]``; attention reads columns ``0 … end-1``."""
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        n, t = ids.shape
        x = self.model.model.embed_tokens.weight[ids].flatten(0, 1)  # (n·t, hidden)
        split, rotated = (heads + 2 * kv_heads) * hd, (heads + kv_heads) * hd
        if at is None:  # a prefill is bound by its arithmetic: q and k are rotated, not computed twice over
            cos, sin = self.cos[positions, :rotated].flatten(0, 1), self.sin_signed[positions].flatten(0, 1)
        else:
            cos, sin = self.cos[positions].flatten(0, 1), self.sin[positions].flatten(0, 1)
        index = torch.arange(rows.start, rows.stop)
        for layer, cache in zip(self.layers, self.cache, strict=True):
            h = self._norm(x, layer.attn_norm)
            if at is None:
                out = F.linear(h, layer.qkv[:split], layer.qkv_bias[:split])
                qk, v = out[:, :rotated], out[:, rotated:]
                swapped = qk.unflatten(-1, (-1, 2, hd // 2)).flip(-2).flatten(1)  # rotate_half; its sign is in sin
                qkv = torch.cat([torch.addcmul(qk * cos, swapped, sin), v], dim=1)
            else:  # a step is bound by its op count: the rotated q and k come with the product
                out = F.linear(h, layer.qkv, layer.qkv_bias)
                qkv = torch.addcmul(out[:, :split] * cos, out[:, split:], sin)
            qkv = qkv.view(n, t, -1, hd).transpose(1, 2)
            q, kv = qkv[:, :heads], qkv[:, heads:]  # (n, heads, t, hd), (n, 2·kv_heads, t, hd)
            if at is None:
                cache[rows, :, :end] = kv
            else:
                cache[index, :, at] = kv[:, :, 0]
            keys, values = cache[rows, :kv_heads, :end], cache[rows, kv_heads:, :end]
            if kv_heads != heads:
                keys = keys.repeat_interleave(heads // kv_heads, dim=1)
                values = values.repeat_interleave(heads // kv_heads, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=layer.scale)
            x = torch.addmm(x, out.transpose(1, 2).reshape(n * t, -1), layer.o_t)
            gate, up = F.linear(self._norm(x, layer.mlp_norm), layer.gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, layer.down_t)
        return self._norm(x, self.model.model.norm.weight).view(n, t, -1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.model.lm_head.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotated_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``w``'s output rows permuted per head as ``rotate_half`` permutes a head's outputs: the product
    with the result is ``rotate_half`` of the product with ``w``, exactly (a signed permutation)."""
    per_head = w.unflatten(0, (-1, head_dim))
    half = head_dim // 2
    return torch.cat((-per_head[:, half:], per_head[:, :half]), dim=1).flatten(0, 1)
