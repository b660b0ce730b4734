"""Greedy consult answers, computed once: an expert pool decoding greedily answers a query with a function of
(model, query, max_tokens), and EAPO's rollouts ask the same queries over and over (the G episodes of a group
at the same moment, the same problems every epoch).

Only answers at temperature 0 are kept, and only what came back: errors are never cached. Concurrent asks of
one key share one upstream call (single flight); the call runs as its own task, so a requester that
disconnects does not cancel it for the others. The cache is a bounded LRU and assumes the pool's weights are
frozen (EAPO's experts are); serve a changed checkpoint under a new model name, or turn it off
(``gateway.answer_cache: 0``, the default). Degrade settings apply after it, per episode.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from eapo.core.metrics import labelled

LOOKUPS = Counter(
    "eapo_gateway_answer_cache_total",
    "Consult answers by cache outcome (hit, shared: joined a call in flight, miss)",
    ["outcome"],
)

Key = tuple[str, str, int]  # model, query, max_tokens


class AnswerCache:
    """Answers by key, least recently used out first; ``outcomes`` counts every lookup."""

    def __init__(self, size: int):
        self.size = size
        self.answers: OrderedDict[Key, str] = OrderedDict()
        self.calls: dict[Key, asyncio.Task[str]] = {}
        self.outcomes = {"hit": 0, "shared": 0, "miss": 0}

    async def answer(self, key: Key, compute: Callable[[], Awaitable[str]]) -> str:
        """The cached answer of ``key``, else the answer of the call in flight for it, else ``compute()``'s."""
        if (cached := self.answers.get(key)) is not None:
            self.answers.move_to_end(key)
            self._count("hit")
            return cached
        call = self.calls.get(key)
        if call is not None:
            self._count("shared")
        else:
            self._count("miss")
            call = self.calls[key] = asyncio.create_task(self._keep(key, compute))
            call.add_done_callback(_retrieve)  # everyone who asked may have gone before it failed
        return await asyncio.shield(call)

    async def _keep(self, key: Key, compute: Callable[[], Awaitable[str]]) -> str:
        try:
            answer = await compute()
        finally:
            del self.calls[key]
        if isinstance(answer, str):
            self.answers[key] = answer
        if len(self.answers) > self.size:
            self.answers.popitem(last=False)
        return answer

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        labelled(LOOKUPS, outcome).inc()


def _retrieve(call: asyncio.Task) -> None:
    if not call.cancelled():
        call.exception()
