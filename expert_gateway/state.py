"""The gateway's shared state: its pools, and the loops that keep them current (health, discovery).

FastAPI handlers get it by dependency injection (``State``); it lives for the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import Counter

from eapo.core.answer_cache import AnswerCache
from eapo.core.config import GatewayConfig
from expert_gateway.discovery import discovered
from expert_gateway.pools import Backend, Pools

log = logging.getLogger(__name__)

ANSWER_CACHE = Counter(
    "eapo_gateway_answer_cache_total",
    "Consult answers by cache outcome (hit, shared: joined a call in flight, miss)",
    ["outcome"],
)


class GatewayState:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.pools = Pools(
            [
                Backend(url=b.url, model=b.model, weight=b.weight, max_in_flight=self.limit(b.max_in_flight))
                for b in config.backends
            ],
            policy=config.policy,
            aliases=config.aliases,
            sticky=config.sticky_episodes,
            sticky_max_imbalance=config.sticky_max_imbalance,
            queue_size=config.queue_size,
            queue_timeout_s=config.queue_timeout_s,
            seed=config.seed,
        )
        self.retiring: set[asyncio.Task] = set()
        # Greedy consult answers by (model, query, max_tokens); degrade settings apply after it, per episode.
        self.answer_cache: AnswerCache[tuple[str, str, int], str] | None = (
            AnswerCache(config.answer_cache, ANSWER_CACHE) if config.answer_cache else None
        )

    def limit(self, own: int | None) -> int | None:
        return own if own is not None else self.config.max_in_flight_per_backend

    def record(self, backend: Backend, ok: bool, reason: str = "") -> None:
        may_eject = bool(self.pools.available_peers(backend))
        backend.record(ok, self.config.eject_after_failures, self.config.eject_s, reason, may_eject)

    def add(self, backend: Backend) -> Backend:
        self.pools.add(backend)  # raises ValueError on a duplicate
        backend.open()
        self.pools.pool(backend.model).wake(everyone=True)  # queued requests may go now
        return backend

    async def retire(self, backend: Backend, timeout_s: float | None = None) -> bool:
        """Drain, wait until idle (up to ``timeout_s``), then forget the backend. True if it went idle."""
        backend.draining = True  # no new requests; the ones in flight finish
        deadline = time.monotonic() + (self.config.request_timeout_s if timeout_s is None else timeout_s)
        while backend.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if backend in self.pools.backends():
            self.pools.remove(backend)
        backend.close()
        return backend.in_flight == 0

    async def health_loop(self) -> None:
        """Active checks of every backend, forever (cancelled at shutdown). Queued requests re-check
        afterwards, so a backend coming back (or a lost wake-up) frees them within one interval."""
        while True:
            checks = self.config.unhealthy_after_checks
            await asyncio.gather(*(b.check(checks) for b in self.pools.backends() if b.http is not None))
            for pool in self.pools.pools():
                pool.wake(everyone=True)
            await asyncio.sleep(self.config.health_interval_s)

    async def discovery_loop(self) -> None:
        """Keep the DNS-discovered backends equal to what the names resolve to now."""
        while True:
            try:
                await self._rediscover()
            except Exception:  # a bug here must not silently end discovery for the gateway's lifetime
                log.exception("discovery round failed; retrying in %.0fs", self.config.discovery_interval_s)
            await asyncio.sleep(self.config.discovery_interval_s)

    async def _rediscover(self) -> None:
        found = await discovered(self.config.discovery)
        if found is None:  # a failed lookup changes nothing
            return
        current = {(b.model, b.url): b for b in self.pools.backends() if b.source == "dns"}
        for (model, url), entry in found.items():
            if (model, url) not in current and not self.pools.find(url, model):
                log.info("discovery: backend %s joins pool %s", url, model)
                limit = self.limit(None)
                self.add(Backend(url=url, model=model, weight=entry.weight, source="dns", max_in_flight=limit))
        for key, backend in current.items():
            if key not in found and not backend.draining:
                log.info("discovery: backend %s left pool %s; draining", backend.url, backend.model)
                task = asyncio.create_task(self.retire(backend))
                self.retiring.add(task)
                task.add_done_callback(self.retiring.discard)


async def get_state(request: Request) -> GatewayState:  # async: FastAPI runs sync dependencies in a thread
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]
