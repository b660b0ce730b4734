"""Answers computed once: a bounded LRU of finished answers, concurrent asks of one key sharing one call.

For answers that are a function of their key, as greedy decoding on frozen weights is: the gateway keeps
consult answers by (model, query, max_tokens), the CPU expert server its completions by prompt and limits
(EAPO's rollouts ask the same queries over and over: the G episodes of a group at the same moment, the
same problems every epoch). Only answers are kept: errors and None never are. The call runs as its own task,
so a requester that disconnects does not cancel it for the others. ``clear`` (new weights) drops every
answer and keeps none from a call begun before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from prometheus_client import Counter

from eapo.core.metrics import labelled

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
log = logging.getLogger(__name__)


class AnswerCache(Generic[K, V]):
    """Answers by key, least recently used out first; ``outcomes`` counts every lookup (hit, shared: joined
    a call in flight, miss), and so does ``counter`` (labelled by outcome) where one is given; with
    ``log_every`` a log line says the counts every that many lookups."""

    def __init__(self, size: int, counter: Counter | None = None, log_every: int = 0):
        self.size, self.counter, self.log_every = size, counter, log_every
        self.answers: OrderedDict[K, V] = OrderedDict()
        self.calls: dict[K, asyncio.Task[V]] = {}
        self.outcomes = {"hit": 0, "shared": 0, "miss": 0}
        self._generation = 0  # bumped by ``clear``: a call begun before it is not kept

    async def answer(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        """The cached answer of ``key``, else the answer of the call in flight for it, else ``compute()``'s."""
        if key in self.answers:
            self.answers.move_to_end(key)
            self._count("hit")
            return self.answers[key]
        call = self.calls.get(key)
        if call is not None:
            self._count("shared")
        else:
            self._count("miss")
            call = self.calls[key] = asyncio.create_task(self._keep(key, compute, self._generation))
            call.add_done_callback(_retrieve)  # everyone who asked may have gone before it failed
        return await asyncio.shield(call)

    def clear(self) -> None:
        self.answers.clear()
        self.calls.clear()
        self._generation += 1

    async def _keep(self, key: K, compute: Callable[[], Awaitable[V]], generation: int) -> V:
        try:
            answer = await compute()
        finally:
            if self._generation == generation:
                del self.calls[key]
        if self._generation == generation and answer is not None:  # None is no answer (vLLM's null content)
            self.answers[key] = answer
            if len(self.answers) > self.size:
                self.answers.popitem(last=False)
        return answer

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self.counter is not None:
            labelled(self.counter, outcome).inc()
        if self.log_every and sum(self.outcomes.values()) % self.log_every == 0:  # counted and read in one step
            log.info("answer cache: %d kept; lookups %s", len(self.answers), dict(self.outcomes))


def _retrieve(call: asyncio.Task) -> None:
    if not call.cancelled():
        call.exception()
