"""Batched sampling with a KV cache for transformers causal LMs on CPU (forward passes: ``decoder``).

Shared by the CPU policy engine and the CPU expert server: the requests of all concurrent callers share
one forward pass per token, joining the running batch at the next token and leaving it when done
(continuous batching, as vLLM's scheduler does), instead of one episode at a time. Each request has its
own seeded generator, so its draws do not depend on what it was batched with (its logits may differ in
the last bits, ``decoder``).

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
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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


@dataclass
class _Row:
    request: SampleRequest
    generator: torch.Generator
    handle: object  # the caller's name for it
    result: SampleResult = field(default_factory=SampleResult)


class RunningBatch:
    """The requests being sampled together: they join (``admit``) whenever the decoder lets them and
    leave as they finish (``advance``) or are given up (``drop``), so on a decoder that takes rows
    mid-batch no row waits for the longest one. A finished row's result is returned before the next
    forward pass, so a failure there concerns only the rows still running."""

    def __init__(
        self, model: torch.nn.Module, max_rows: int, pad_id: int, tokenizer: PreTrainedTokenizerFast | None = None
    ):
        self.model, self.decoder = model, open_decoder(model, max_rows, pad_id)
        embeddings = getattr(model, "get_input_embeddings", None)  # every transformers model has it
        self.max_rows, self.vocab = max_rows, embeddings().num_embeddings if embeddings else None
        self.decode = text_decoder(tokenizer) if tokenizer is not None else None
        self.rows: list[_Row] = []
        self.logits = torch.empty(0)  # each row's next-token logits, once the pending step has run
        self._pending = False  # the rows' last tokens are drawn but not yet fed

    @property
    def room(self) -> int:
        """How many requests ``admit`` takes now."""
        return self.max_rows - len(self.rows) if self.decoder.joins or not self.rows else 0

    def refuses(self, request: SampleRequest) -> str | None:
        """Why ``admit`` cannot sample ``request``, or None."""
        if not request.prompt_ids:
            return "empty prompt: nothing to continue"
        if request.max_new_tokens < 1:
            return f"max_new_tokens {request.max_new_tokens}: at least 1 token must be asked for"
        if self.vocab is not None and not all(0 <= i < self.vocab for i in request.prompt_ids):
            return f"prompt token ids outside the model's vocabulary of {self.vocab}"
        if self.decode is None and request.stop_strings:
            return "stop strings need the model's tokenizer to be read"
        return None

    @torch.inference_mode()
    def admit(self, requests: Sequence[SampleRequest], handles: Sequence[object]) -> None:
        if len(requests) > self.room:
            raise ValueError(f"{len(requests)} requests, room for {self.room}")
        if wrong := next(filter(None, map(self.refuses, requests)), None):
            raise ValueError(wrong)
        if not requests:
            return
        self._catch_up()
        logits = self.decoder.add([r.prompt_ids for r in requests], [r.max_new_tokens - 1 for r in requests])
        self.logits = torch.cat([self.logits, logits]) if self.rows else logits
        self.rows += [_Row(r, torch.Generator().manual_seed(r.seed), h) for r, h in zip(requests, handles, strict=True)]

    @torch.inference_mode()
    def advance(self) -> list[tuple[object, SampleResult]]:
        """Draws one token for every row; returns the rows that finished, by handle."""
        self._catch_up()
        tokens, logprobs = draw(self.logits, [r.request for r in self.rows], [r.generator for r in self.rows])
        finished: list[int] = []
        for i, (row, token, logprob) in enumerate(zip(self.rows, tokens, logprobs, strict=True)):
            r, res = row.request, row.result
            res.token_ids.append(token)
            res.logprobs.append(logprob)
            if token in r.stop_ids:
                res.finish = "stop"
            elif r.stop_strings and (hit := completed_stop(self.decode, res.token_ids, r.stop_strings)) is not None:
                res.finish, res.stop_string = "stop", hit
            if res.finish == "stop" or len(res.token_ids) >= r.max_new_tokens:
                finished.append(i)  # its last token is drawn, never fed back
        done = [(self.rows[i].handle, self.rows[i].result) for i in finished]
        self._pending = True
        self._leave(finished)
        return done

    def drop(self, given_up: Callable[[object], bool]) -> None:
        """Leaves out the rows whose handle ``given_up`` names (their callers went away)."""
        self._leave([i for i, row in enumerate(self.rows) if given_up(row.handle)])

    def _leave(self, rows: list[int]) -> None:
        if rows:
            order = refill(len(self.rows), rows)
            self.decoder.keep(order)
            self.rows = [self.rows[i] for i in order]
            if not self._pending:
                self.logits = self.logits[order]

    def _catch_up(self) -> None:
        if self._pending and self.rows:
            self.logits = self.decoder.step([row.result.token_ids[-1] for row in self.rows])
        self._pending = False


def refill(rows: int, finished: list[int]) -> list[int]:
    """The rows kept when ``finished`` leave: each hole is filled by the last running row, so only as many
    rows move as there are holes before the new end."""
    gone = set(finished)
    n = rows - len(gone)
    movers = [r for r in range(n, rows) if r not in gone]
    return [movers.pop() if r in gone else r for r in range(n)]


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
    batch = RunningBatch(model, len(requests), pad_id, tokenizer)
    batch.admit(requests, range(len(requests)))
    results: dict[object, SampleResult] = {}
    while batch.rows:
        results.update(batch.advance())
    return [results[i] for i in range(len(requests))]


_STOP = object()


class Batcher:
    """Serves concurrent ``sample`` calls from one running batch (continuous batching) on a thread of
    its own: a request joins the batch at the next token, not after the batch in progress.

    ``set_model`` takes effect once the running rows finish (new requests wait meanwhile): every row
    runs on the weights it started with, which is what makes per-turn policy versions exact. ``model``
    and ``version`` are the newest set. ``tokenizer`` (the model's) checks stop strings. A request the
    batch cannot sample fails alone (``ValueError``); a failed forward pass fails the rows it carried and
    the batcher serves on; after ``close`` every request fails.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        max_batch: int = 64,
        version: int = 0,
        tokenizer: PreTrainedTokenizerFast | None = None,
    ):
        self.pad_id, self.max_batch, self.tokenizer = pad_id, max_batch, tokenizer
        self._newest = (model, version)  # one tuple: the loop never reads one's model with another's version
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def model(self) -> torch.nn.Module:
        return self._newest[0]

    @property
    def version(self) -> int:
        return self._newest[1]

    def set_model(self, model: torch.nn.Module, version: int) -> None:
        self._newest = (model, version)

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        """Returns the result and the model version that produced it."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
            self._thread.start()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inbox.put((request, fut))
        return await fut

    def _serve(self) -> None:
        """The batch loop: take new requests, admit what fits, advance every row a token, hand back what
        finished. Blocks only while nothing runs or waits."""
        waiting: deque[tuple[SampleRequest, asyncio.Future]] = deque()
        batch: RunningBatch | None = None
        batch_weights = self._newest
        while True:
            item = None
            with contextlib.suppress(queue.Empty):
                item = self._inbox.get(block=not waiting and (batch is None or not batch.rows))
                while item is not _STOP:
                    waiting.append(item)
                    item = self._inbox.get_nowait()
            if item is _STOP:
                _fail([*waiting, *_drain(self._inbox), *(batch.rows if batch else [])], "the batcher closed")
                return
            take: list[tuple[SampleRequest, asyncio.Future]] = []
            try:
                newest = self._newest
                if batch is None or (not batch.rows and batch_weights is not newest):
                    batch, batch_weights = RunningBatch(newest[0], self.max_batch, self.pad_id, self.tokenizer), newest
                batch.drop(lambda handle: handle[1].cancelled())
                if batch_weights is newest:  # else: the new weights wait for the running rows to finish
                    take = [waiting.popleft() for _ in range(min(batch.room, len(waiting)))]
                    admitted = []
                    for item in take:
                        if why := batch.refuses(item[0]):
                            _fail([item], why, ValueError)  # this request is wrong, not the batch
                        elif not item[1].cancelled():
                            admitted.append(item)
                    take = admitted
                    batch.admit([r for r, _ in take], take)
                    take = []
                done = batch.advance() if batch.rows else []
            except Exception as exc:  # surface to every waiter it concerns; the batcher serves on
                log.exception("generation batch failed")
                _fail([*take, *(batch.rows if batch else [])], f"generation failed: {exc!r}")
                batch = None
                continue
            for (_, fut), result in done:
                _resolve(fut, (result, batch_weights[1]))

    async def close(self) -> None:
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            await asyncio.to_thread(self._thread.join)
        _fail(_drain(self._inbox), "the batcher closed")  # put while it stopped


def _drain(inbox: queue.SimpleQueue) -> list:
    items = []
    with contextlib.suppress(queue.Empty):
        while True:
            items.append(inbox.get_nowait())
    return [item for item in items if item is not _STOP]


def _resolve(fut: asyncio.Future, value: object) -> None:
    with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
        fut.get_loop().call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))


def _fail(items: Iterable[object], why: str, kind: type[Exception] = RuntimeError) -> None:
    """Fails the futures of ``items``: queued ``(request, future)`` pairs or running rows."""
    for item in items:
        _, fut = item.handle if isinstance(item, _Row) else item
        with contextlib.suppress(RuntimeError):
            fut.get_loop().call_soon_threadsafe(lambda f=fut: f.done() or f.set_exception(kind(why)))
