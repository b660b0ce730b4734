"""Backends and pools: where a request can go, and which backend of a pool it goes to.

A pool is keyed by model name (aliases map onto pools). A backend takes new requests while it is
*available*: healthy by the last active check, not ejected, not draining. Among the available backends
with room (below their in-flight limit) the pool's policy picks: least outstanding requests by default
(load = in-flight / weight, so heterogeneous pools balance by capacity), power of two choices,
round robin, or smooth weighted round robin; ties break at random from a seeded RNG. With stickiness
on, an episode's later requests go to the backend that served it before while that backend is not
overloaded (prefix-cache friendly).

When every available backend is at its limit, a request waits in the pool's bounded FIFO queue for a
slot; a full queue or a wait past its deadline is refused (``QueueFull`` → 429) — never unbounded
queueing. In-flight counts rise at pick and fall in a ``finally`` that covers stream end, errors and
client disconnects, and each fall wakes one waiter.

Passive health: ``eject_after`` consecutive failed requests eject a backend; it comes back once the
ejection has run out and an active ``GET /health`` succeeds. Each backend owns one connection pool
(``expert_gateway.upstream``: keep-alive, no connection cap), never a client per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from expert_gateway.upstream import HttpPool, UpstreamError

Policy = Literal["least_outstanding", "power_of_two", "round_robin", "weighted"]
STICKY_EPISODES_KEPT = 100_000  # episode → backend entries kept (least recently used go first)


@dataclass(eq=False)
class Backend:
    url: str
    model: str
    weight: float = 1.0
    max_in_flight: int | None = None
    source: str = "static"  # static (config), dns (discovery) or admin (added at run time)
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    http: HttpPool | None = None
    healthy: bool = True
    draining: bool = False
    consecutive_failures: int = 0
    failed_checks: int = 0
    ejected_until: float = 0.0
    ejections: deque[dict] = field(default_factory=lambda: deque(maxlen=32))
    current_weight: float = 0.0  # smooth weighted round robin's running score

    def available(self, now: float) -> bool:
        return self.healthy and not self.draining and now >= self.ejected_until

    def state(self, now: float) -> str:
        if self.draining:
            return "draining"
        if now < self.ejected_until:
            return "ejected"
        return "available" if self.healthy else "unhealthy"

    def has_room(self) -> bool:
        return self.max_in_flight is None or self.in_flight < self.max_in_flight

    def load(self) -> float:
        return self.in_flight / self.weight

    def record(self, ok: bool, eject_after: int, eject_s: float, reason: str = "", may_eject: bool = True) -> None:
        """Passive health: a success resets the count; ``eject_after`` failures in a row eject, unless
        ``may_eject`` is false (the pool's last available backend: ejecting it would turn every request
        into a 503, while retrying it may still succeed)."""
        if ok:
            self.consecutive_failures = 0
            return
        self.errors += 1
        self.consecutive_failures += 1
        if may_eject and self.consecutive_failures >= eject_after and time.monotonic() >= self.ejected_until:
            self.ejected_until = time.monotonic() + eject_s
            self.healthy = False  # back only through a successful active check
            self.ejections.append({"at": time.time(), "reason": reason, "failures": self.consecutive_failures})

    async def check(self, unhealthy_after: int = 1, timeout_s: float = 2.0) -> bool:
        """Active health: vLLM's ``GET /health``. ``unhealthy_after`` failed checks in a row take the
        backend out (one slow answer under load does not); a success re-admits a backend whose ejection
        ran out, and leaves a backend in service its count of failed requests in a row: ``/health`` passing
        says nothing of requests, and a reset there kept a backend failing every request in whenever
        health checks came between its requests (a low request rate, or a busy machine)."""
        assert self.http is not None
        try:
            resp = await self.http.request("GET", "health", timeout_s=timeout_s)
            try:
                await resp.read()
            finally:
                resp.release()
            ok = resp.status == 200
        except UpstreamError:
            ok = False
        self.failed_checks = 0 if ok else self.failed_checks + 1
        if ok and time.monotonic() >= self.ejected_until:
            if not self.healthy:  # re-admitted: its failed requests start over
                self.consecutive_failures = 0
            self.healthy = True
        elif self.failed_checks >= unhealthy_after:
            self.healthy = False
        return ok

    def open(self) -> None:
        if self.http is None:
            self.http = HttpPool(self.url)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

    def latency_percentiles(self) -> dict[str, float | None]:
        if not self.latencies_ms:
            return {"p50": None, "p95": None, "p99": None}
        p50, p95, p99 = np.percentile(np.fromiter(self.latencies_ms, float), [50, 95, 99])
        return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2)}


class NoBackend(LookupError):
    """The model has no pool, or its pool has no backend left to try."""


class NoHealthyBackend(NoBackend):
    """The pool exists but none of its backends is available now."""


class AllTried(NoBackend):
    """Every available backend of the pool was already tried for this request."""


class QueueFull(RuntimeError):
    """Every available backend is at its limit and the admission queue is full or the wait ran out."""


class Pool:
    def __init__(self, model: str):
        self.model = model
        self.backends: list[Backend] = []
        self.waiters: deque[asyncio.Future[None]] = deque()  # the admission queue, FIFO
        self.rejected = 0
        self.next_rr = 0

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def wake(self, everyone: bool = False) -> None:
        """A slot freed (the longest waiter re-checks) or the pool changed (every waiter re-checks)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return


class Pools:
    def __init__(
        self,
        backends: list[Backend] = (),  # type: ignore[assignment]
        policy: Policy = "least_outstanding",
        aliases: dict[str, str] | None = None,
        sticky: bool = False,
        sticky_max_imbalance: float = 4.0,
        queue_size: int = 1024,
        queue_timeout_s: float = 10.0,
        seed: int = 0,
    ):
        self._pools: dict[str, Pool] = {}
        self.aliases = dict(aliases or {})
        self.policy, self.sticky, self.sticky_max_imbalance = policy, sticky, sticky_max_imbalance
        self.queue_size, self.queue_timeout_s = queue_size, queue_timeout_s
        self._sticky: OrderedDict[str, Backend] = OrderedDict()
        self._rng = random.Random(seed)
        for b in backends:
            self.add(b)

    @property
    def models(self) -> list[str]:
        return sorted(self._pools)

    def pools(self) -> list[Pool]:
        return [self._pools[m] for m in self.models]

    def backends(self) -> list[Backend]:
        return [b for pool in self._pools.values() for b in pool.backends]

    def resolve(self, model: str) -> str:
        """The served model name behind ``model`` (itself or an alias's target)."""
        return self.aliases.get(model, model)

    def pool(self, model: str) -> Pool:
        pool = self._pools.get(self.resolve(model))
        if pool is None:
            served = ", ".join(self.models + sorted(self.aliases)) or "none"
            raise NoBackend(f"unknown model {model!r}; served models: {served}")
        return pool

    def find(self, url: str, model: str | None = None) -> list[Backend]:
        url = url.rstrip("/")
        return [b for b in self.backends() if b.url.rstrip("/") == url and (model is None or b.model == model)]

    def available_peers(self, backend: Backend) -> list[Backend]:
        """The other backends of ``backend``'s pool that take requests now (none if it was removed)."""
        pool, now = self._pools.get(backend.model), time.monotonic()
        return [] if pool is None else [b for b in pool.backends if b is not backend and b.available(now)]

    def add(self, backend: Backend) -> None:
        if self.find(backend.url, backend.model):
            raise ValueError(f"backend {backend.url} already serves {backend.model!r}")
        self._pools.setdefault(backend.model, Pool(backend.model)).backends.append(backend)

    def remove(self, backend: Backend) -> None:
        """Forget a backend (callers drain it first); an emptied pool disappears."""
        pool = self._pools[backend.model]
        pool.backends.remove(backend)
        if not pool.backends:
            del self._pools[backend.model]
        for episode in [e for e, b in self._sticky.items() if b is backend]:
            del self._sticky[episode]

    def _choose(self, pool: Pool, candidates: list[Backend]) -> Backend:
        if self.policy == "round_robin":
            pool.next_rr += 1
            return candidates[pool.next_rr % len(candidates)]
        if self.policy == "weighted":  # nginx's smooth weighted round robin
            total = sum(b.weight for b in candidates)
            for b in candidates:
                b.current_weight += b.weight
            best = max(candidates, key=lambda b: b.current_weight)
            best.current_weight -= total
            return best
        if self.policy == "power_of_two" and len(candidates) > 2:
            candidates = self._rng.sample(candidates, 2)
        least, tied = float("inf"), []
        for b in candidates:  # one pass: this runs on every request
            load = b.load()
            if load < least:
                least, tied = load, [b]
            elif load == least:
                tied.append(b)
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def pick(self, model: str, exclude: set[Backend] = frozenset(), episode: str | None = None) -> Backend | None:  # type: ignore[assignment]
        """A backend for the request, or None when every available one is at its in-flight limit."""
        pool = self.pool(model)
        now = time.monotonic()
        available = untried = 0
        candidates = []
        for b in pool.backends:  # one pass: this runs on every request
            if b.available(now):
                available += 1
                if b not in exclude:
                    untried += 1
                    if b.has_room():
                        candidates.append(b)
        if not available:
            raise NoHealthyBackend(f"no healthy backend in pool {pool.model!r}")
        if not untried:
            raise AllTried(f"no backend of pool {pool.model!r} left to try")
        if not candidates:
            return None
        if self.sticky and episode is not None:
            held = self._sticky.get(episode)
            if held in candidates and held.load() <= min(b.load() for b in candidates) + self.sticky_max_imbalance:
                self._sticky.move_to_end(episode)
                return held
            chosen = self._choose(pool, candidates)
            self._sticky[episode] = chosen
            self._sticky.move_to_end(episode)
            if len(self._sticky) > STICKY_EPISODES_KEPT:
                self._sticky.popitem(last=False)
            return chosen
        return self._choose(pool, candidates)

    async def _wait_for_room(self, pool: Pool, timeout_s: float, pick: Callable[[], Backend | None]) -> Backend:
        """The admission queue: FIFO, bounded in size and in time. A woken waiter that still finds no
        room (the slot went to a backend it must not use) queues again at the back."""
        if pool.waiting >= self.queue_size:
            pool.rejected += 1
            raise QueueFull(f"pool {pool.model!r}: all backends busy and {pool.waiting} requests already queued")
        deadline = time.monotonic() + timeout_s
        loop = asyncio.get_running_loop()
        while (backend := pick()) is None:
            waiter = loop.create_future()
            pool.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                pool.rejected += 1
                raise QueueFull(f"pool {pool.model!r}: no backend slot freed within {timeout_s:.1f}s") from None
            finally:
                if not waiter.done() or waiter.cancelled():
                    with contextlib.suppress(ValueError):
                        pool.waiters.remove(waiter)
        return backend

    async def acquire(
        self,
        model: str,
        exclude: set[Backend] = frozenset(),  # type: ignore[assignment]
        episode: str | None = None,
        deadline: float | None = None,
    ) -> Backend:
        """A slot on a backend for one upstream attempt (waits in the queue when all are busy); the
        caller gives it back with ``release`` in a ``finally``."""
        pool = self.pool(model)
        backend = None if pool.waiters else self.pick(model, exclude, episode)  # no overtaking the queue
        if backend is None:
            wait = self.queue_timeout_s if deadline is None else min(self.queue_timeout_s, deadline - time.monotonic())
            backend = await self._wait_for_room(pool, max(wait, 0.0), lambda: self.pick(model, exclude, episode))
        backend.in_flight += 1
        backend.requests += 1
        return backend

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        pool = self._pools.get(backend.model)
        if pool is not None and pool.waiters:
            pool.wake()
