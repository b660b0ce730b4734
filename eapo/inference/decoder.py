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
and a step is a few dozen tensor ops. The weights are the model's own tensors (nothing is copied), so
a model swapped in between batches is read as it is. It calls the same attention kernel
(``scaled_dot_product_attention``) on the same values, so its logits equal those of transformers' SDPA
forward with ``logits_to_keep=1`` (what ``TransformersDecoder`` runs) up to rounding: a row attends
over the batch's widest row, masked, where transformers' rows are left-padded, and the sums round
differently (≤ 1e-5, tests/test_decoder.py). Anything else (another architecture, RoPE scaling,
sliding windows, another attention implementation, a dtype other than float32, a GPU) runs through
``TransformersDecoder``, whose cache takes new rows only when its batch has drained.
"""

from __future__ import annotations

import inspect
from typing import Protocol

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


class Qwen2Decoder:
    """Qwen2's forward over a slot KV cache: row ``r`` holds its request's tokens in columns
    ``0 … lengths[r]-1``, positions counting from 0, so each row is computed as if alone (up to
    rounding) and rows join and leave between steps (continuous batching). Columns past a row's length
    hold finite leftovers (the cache starts zeroed) that the mask hides: a NaN there would poison the
    row even at zero weight."""

    joins = True

    def __init__(self, model: Qwen2ForCausalLM, max_rows: int, columns: int = 256):
        cfg = model.config
        self.model, self.eps = model, cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.rows, self.max_rows = 0, max_rows
        self.lengths = torch.zeros(max_rows, dtype=torch.long)
        shape = (max_rows, self.kv_heads, columns, self.head_dim)
        layers = len(model.model.layers)
        self.keys = [torch.zeros(shape) for _ in range(layers)]
        self.values = [torch.zeros(shape) for _ in range(layers)]
        self.inv_freq = model.model.rotary_emb.inv_freq

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
            for cache in (*self.keys, *self.values):
                cache[new] = cache[old]  # reads every moved row before writing any
            self.lengths[new] = self.lengths[old]
        self.rows = len(rows)

    def _reserve(self, columns: int) -> None:
        have = self.keys[0].shape[2]
        if columns > have:
            grow = max(columns, 2 * have) - have
            pad = (0, 0, 0, grow)  # the column dimension, zero-filled
            self.keys = [F.pad(c, pad) for c in self.keys]
            self.values = [F.pad(c, pad) for c in self.values]

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
        m = self.model.model
        x = m.embed_tokens.weight[ids]
        freqs = positions[..., None].float() * self.inv_freq
        cos, sin = freqs.cos().repeat(1, 1, 2)[:, None], freqs.sin().repeat(1, 1, 2)[:, None]
        index = torch.arange(rows.start, rows.stop)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = self._norm(x, layer.input_layernorm.weight)
            q = self._heads(F.linear(h, a.q_proj.weight, a.q_proj.bias), self.heads)
            k = self._heads(F.linear(h, a.k_proj.weight, a.k_proj.bias), self.kv_heads)
            v = self._heads(F.linear(h, a.v_proj.weight, a.v_proj.bias), self.kv_heads)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            if at is None:
                self.keys[i][rows, :, :end] = k
                self.values[i][rows, :, :end] = v
            else:
                self.keys[i][index, :, at] = k[:, :, 0]
                self.values[i][index, :, at] = v[:, :, 0]
            keys, values = self.keys[i][rows, :, :end], self.values[i][rows, :, :end]
            if self.kv_heads != self.heads:
                keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
                values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=a.scaling)
            x = x + F.linear(out.transpose(1, 2).flatten(2), a.o_proj.weight)
            h = self._norm(x, layer.post_attention_layernorm.weight)
            gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
            x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        return self._norm(x, m.norm.weight)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.model.lm_head.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
