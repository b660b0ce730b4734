"""Batched sampling with a KV cache for transformers causal LMs on CPU (forward passes: ``decoder``).

Shared by the CPU policy engine and the CPU expert server: the pending requests of all concurrent
callers are stacked (left-padded) into one forward pass per token instead of one episode at a time.
Each request has its own seeded generator, so its draws do not depend on what it was batched with.

A turn ends at a stop id (EOS) or at a stop *string* (a consult block's closing tag): under a BPE
tokenizer a tag is several tokens and may merge with its neighbours (``></``, ``>\n``), so only the
decoded text can say where it ends. The rule, the same as vLLM's: the turn ends at the first sampled
token whose decoded text completes the string; every sampled id is kept as sampled, that token
included, even where its text runs past the string (readers of the turn cut the text at the string).
The behaviour log-prob recorded for a token is under the temperature-scaled distribution it was drawn
from (DAPO samples at temperature 1.0, top-p 1.0, where this is exactly the policy's log-prob).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerFast

from eapo.inference.decoder import open_decoder

log = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class SampleResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Literal["stop", "length"] = "length"
    stop_string: str | None = None  # the stop string that ended the turn (None: a stop id, or the length)


# Tokens decoded to find a stop string that the newest token completes: a string of n characters spans
# at most n tokens that decode to at least one character each; the slack covers a few that decode to none.
STOP_WINDOW_SLACK = 8


def completed_stop(decode: Callable[[Sequence[int]], str], ids: Sequence[int], stops: Sequence[str]) -> str | None:
    """The first of ``stops`` found in the decoded text of the last sampled tokens ``ids``, or None.

    Called after every sampled token, so a string found now was completed by the newest token. Only a
    bounded tail is decoded (a turn may be thousands of tokens long)."""
    if not stops or not ids:
        return None
    text = decode(ids[-(max(map(len, stops)) + STOP_WINDOW_SLACK) :])
    return next((s for s in stops if s in text), None)


def text_decoder(tokenizer: PreTrainedTokenizerFast) -> Callable[[Sequence[int]], str]:
    """Ids to text straight from the Rust tokenizer, special tokens kept (a tag may be one)."""
    backend = tokenizer.backend_tokenizer
    return lambda ids: backend.decode(list(ids), skip_special_tokens=False)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
    sorted_logits[drop] = float("-inf")
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token of each row of ``probs`` (a distribution) at which its CDF passes ``uniform`` ∈ [0, 1)."""
    tokens = torch.searchsorted(probs.cumsum(dim=-1), uniform[:, None], right=True).squeeze(1)
    # A CDF summed in floats may end below u: take the last token with mass, never one without.
    return torch.minimum(tokens, (probs > 0).cumsum(dim=-1).argmax(dim=-1))


def draw(
    logits: torch.Tensor, requests: Sequence[SampleRequest], generators: Sequence[torch.Generator]
) -> tuple[list[int], list[float]]:
    """One token for each row of ``logits``, and its log-prob under the temperature-scaled distribution.

    Vectorised inverse-CDF sampling: each row draws one uniform from its own generator (so its tokens do
    not depend on its batch-mates) and the batch picks the tokens at once. ``torch.multinomial`` per row
    cost ~0.1 ms a call, about as much as the tiny models' forward pass; the draws differ from it, the
    distribution does not."""
    temperature = torch.tensor([max(r.temperature, 1e-6) for r in requests])
    scaled = logits / temperature[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    for i, r in enumerate(requests):
        if r.top_p < 1.0 and r.temperature > 0:
            probs[i] = torch.softmax(_filter_top_p(scaled[i], r.top_p), dim=-1)
    tokens = inverse_cdf(probs, torch.cat([torch.rand(1, generator=g) for g in generators]))
    greedy = torch.tensor([r.temperature <= 0 for r in requests])
    tokens = torch.where(greedy, scaled.argmax(dim=-1), tokens)
    return tokens.tolist(), logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    requests: list[SampleRequest],
    pad_id: int,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> list[SampleResult]:
    """Sample every request to its stop id, stop string or length limit, in shared forward passes.
    ``tokenizer`` reads the sampled ids as text; it is needed only by requests with stop strings."""
    if not requests:
        return []
    if tokenizer is None and any(r.stop_strings for r in requests):
        raise ValueError("stop strings need the tokenizer: pass generate_batch(..., tokenizer=)")
    decode = text_decoder(tokenizer) if tokenizer is not None else None
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids) :] = 1
    longest = max(r.max_new_tokens for r in requests)
    decoder = open_decoder(model, mask, longest - 1)  # the last token is drawn, never fed back
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    results = [SampleResult() for _ in requests]
    active = list(range(len(requests)))
    logits = decoder.prefill(ids)
    for _ in range(longest):
        next_ids = torch.full((len(requests), 1), pad_id, dtype=torch.long)
        tokens, logprobs = draw(logits[active], [requests[row] for row in active], [generators[row] for row in active])
        for row, token, logprob in zip(active, tokens, logprobs, strict=True):
            r, res = requests[row], results[row]
            res.token_ids.append(token)
            res.logprobs.append(logprob)
            next_ids[row, 0] = token
            if token in r.stop_ids:
                res.finish = "stop"
            elif r.stop_strings and (hit := completed_stop(decode, res.token_ids, r.stop_strings)) is not None:
                res.finish, res.stop_string = "stop", hit
        active = [
            row
            for row in active
            if results[row].finish != "stop" and len(results[row].token_ids) < requests[row].max_new_tokens
        ]
        if not active:
            break
        logits = decoder.step(next_ids)
    return results


class Batcher:
    """Collects concurrent ``sample`` calls and runs them together, one batch at a time, off the loop.

    ``model`` may be swapped between batches (``set_model``): a batch in progress finishes on the
    weights it started with, which is what makes per-turn policy versions exact. ``tokenizer`` (the
    model's) checks stop strings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        max_batch: int = 64,
        version: int = 0,
        tokenizer: PreTrainedTokenizerFast | None = None,
    ):
        self.model, self.pad_id, self.max_batch, self.version = model, pad_id, max_batch, version
        self.tokenizer = tokenizer
        self._queue: asyncio.Queue[tuple[SampleRequest, asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.batched_requests = 0

    def set_model(self, model: torch.nn.Module, version: int) -> None:
        self.model, self.version = model, version

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        """Returns the result and the model version that produced it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((request, fut))
        return await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(0)  # let callers that are ready this tick join the batch
            while not self._queue.empty() and len(batch) < self.max_batch:
                batch.append(self._queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.cancelled()]
            if not batch:
                continue
            model, version = self.model, self.version
            try:
                results = await asyncio.to_thread(
                    generate_batch, model, [r for r, _ in batch], self.pad_id, self.tokenizer
                )
            except Exception as exc:  # surface to every waiter; the batcher keeps serving
                log.exception("generation batch failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.batched_requests += len(batch)
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result((res, version))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
