"""Backends and pools: where a request can go, and which backend of a pool it goes to.

A pool is keyed by model name. Within it the default policy is least outstanding requests, ties
broken at random, among *available* backends: healthy by the last active check and not ejected.
A backend is ejected after consecutive failed requests (passive) and comes back once its ejection
has run out and an active ``GET /health`` succeeds. Each backend owns one aiohttp connection pool
(keep-alive, no connection cap), never a client per request. In-flight counts rise at pick and fall
in a ``finally``.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import numpy as np


@dataclass(eq=False)
class Backend:
    url: str
    model: str
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    session: aiohttp.ClientSession | None = None
    healthy: bool = True
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: deque[dict] = field(default_factory=lambda: deque(maxlen=32))

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def record(self, ok: bool, eject_after: int, eject_s: float, reason: str = "") -> None:
        """Passive health: a success resets the count; ``eject_after`` failures in a row eject."""
        if ok:
            self.consecutive_failures = 0
            return
        self.errors += 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= eject_after and time.monotonic() >= self.ejected_until:
            self.ejected_until = time.monotonic() + eject_s
            self.healthy = False  # back only through a successful active check
            self.ejections.append({"at": time.time(), "reason": reason, "failures": self.consecutive_failures})

    async def check(self, timeout_s: float = 2.0) -> bool:
        """Active health: vLLM's ``GET /health``. Re-admits a backend whose ejection ran out."""
        assert self.session is not None
        try:
            async with self.session.get("health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok and time.monotonic() >= self.ejected_until:
            self.healthy, self.consecutive_failures = True, 0
        elif not ok:
            self.healthy = False
        return ok

    def open(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            self.session = aiohttp.ClientSession(base_url=self.url.rstrip("/") + "/", connector=connector)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def latency_percentiles(self) -> dict[str, float | None]:
        if not self.latencies_ms:
            return {"p50": None, "p95": None, "p99": None}
        p50, p95, p99 = np.percentile(np.fromiter(self.latencies_ms, float), [50, 95, 99])
        return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2)}


class NoBackend(LookupError):
    """The model has no pool, or its pool has no backend left to try."""


class NoHealthyBackend(NoBackend):
    """The pool exists but none of its backends is available now."""


class Pools:
    def __init__(self, backends: list[Backend], seed: int = 0):
        self._pools: dict[str, list[Backend]] = {}
        for b in backends:
            self._pools.setdefault(b.model, []).append(b)
        self._rng = random.Random(seed)

    @property
    def models(self) -> list[str]:
        return sorted(self._pools)

    def backends(self) -> list[Backend]:
        return [b for pool in self._pools.values() for b in pool]

    def pick(self, model: str, exclude: set[Backend] = frozenset()) -> Backend:  # type: ignore[assignment]
        """Least outstanding requests among the pool's backends not in ``exclude``."""
        if model not in self._pools:
            raise NoBackend(f"unknown model {model!r}; served models: {', '.join(self.models) or 'none'}")
        now = time.monotonic()
        candidates = [b for b in self._pools[model] if b not in exclude and b.available(now)]
        if not candidates:
            if not any(b.available(now) for b in self._pools[model]):
                raise NoHealthyBackend(f"no healthy backend in pool {model!r}")
            raise NoBackend(f"no backend of pool {model!r} left to try")
        least = min(b.in_flight for b in candidates)
        return self._rng.choice([b for b in candidates if b.in_flight == least])

    @asynccontextmanager
    async def lease(self, model: str, exclude: set[Backend] = frozenset()) -> AsyncIterator[Backend]:  # type: ignore[assignment]
        backend = self.pick(model, exclude)
        backend.in_flight += 1
        backend.requests += 1
        try:
            yield backend
        finally:
            backend.in_flight -= 1
