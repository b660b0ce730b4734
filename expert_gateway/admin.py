"""The admin API: what the gateway is doing, and changing its backends at run time.

``GET /admin/backends``, ``GET /admin/pools`` and ``GET /admin/answer-cache`` are the inspection views
(state, in-flight, totals, errors, latency percentiles, ejection history, queue depth, cache outcomes);
``POST /admin/backends`` adds a backend, ``POST /admin/backends/drain`` stops new traffic to one while its
in-flight requests finish, and ``DELETE /admin/backends`` drains and then removes it. The same live state
feeds ``/metrics``.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field

from expert_gateway.pools import Backend
from expert_gateway.state import GatewayState, State

router = APIRouter(tags=["admin"])


class BackendView(BaseModel):
    url: str
    model: str
    source: str = Field(description="static (config), dns (discovery) or admin (added at run time)")
    state: str = Field(description="available, unhealthy (failed its recent checks), ejected or draining")
    weight: float
    max_in_flight: int | None
    in_flight: int
    requests: int
    errors: int
    consecutive_failures: int
    latency_ms: dict[str, float | None] = Field(description="time to response headers, last 2048 requests")
    ejections: list[dict]


class PoolView(BaseModel):
    model: str
    aliases: list[str]
    policy: str
    backends: int
    available: int
    in_flight: int
    queued: int = Field(description="requests waiting for a backend slot now")
    rejected: int = Field(description="requests refused because the queue was full or the wait ran out")
    requests: int
    errors: int


class AnswerCacheView(BaseModel):
    size: int = Field(description="answers it may keep; 0: off")
    entries: int
    in_flight: int = Field(description="upstream calls that other asks of the same key wait on")
    hit: int
    shared: int = Field(description="asks that joined a call in flight")
    miss: int


class BackendSpec(BaseModel):
    model: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://[^\s/]+", description="e.g. http://10.0.3.7:8000")
    weight: float = Field(1.0, gt=0)
    max_in_flight: int | None = Field(None, ge=1)


def view(b: Backend, now: float) -> BackendView:
    return BackendView(
        url=b.url,
        model=b.model,
        source=b.source,
        state=b.state(now),
        weight=b.weight,
        max_in_flight=b.max_in_flight,
        in_flight=b.in_flight,
        requests=b.requests,
        errors=b.errors,
        consecutive_failures=b.consecutive_failures,
        latency_ms=b.latency_percentiles(),
        ejections=list(b.ejections),
    )


def find(state: GatewayState, url: str, model: str | None) -> list[Backend]:
    found = state.pools.find(url, model)
    if not found:
        raise HTTPException(404, f"no backend {url}" + (f" in pool {model!r}" if model else ""))
    return found


Url = Annotated[str, Query(description="the backend's base URL as listed by GET /admin/backends")]
Model = Annotated[str | None, Query(description="its pool; needed only when the URL serves several")]


@router.get("/backends", response_model=list[BackendView])
async def backends(state: State) -> list[BackendView]:
    now = time.monotonic()
    return [view(b, now) for b in state.pools.backends()]


@router.get("/pools", response_model=list[PoolView])
async def pools(state: State) -> list[PoolView]:
    now = time.monotonic()
    return [
        PoolView(
            model=p.model,
            aliases=sorted(a for a, m in state.pools.aliases.items() if m == p.model),
            policy=state.pools.policy,
            backends=len(p.backends),
            available=sum(b.available(now) for b in p.backends),
            in_flight=sum(b.in_flight for b in p.backends),
            queued=p.waiting,
            rejected=p.rejected,
            requests=sum(b.requests for b in p.backends),
            errors=sum(b.errors for b in p.backends),
        )
        for p in state.pools.pools()
    ]


@router.get("/answer-cache", response_model=AnswerCacheView)
async def answer_cache(state: State) -> AnswerCacheView:
    cache = state.answer_cache
    if cache is None:
        return AnswerCacheView(size=0, entries=0, in_flight=0, hit=0, shared=0, miss=0)
    return AnswerCacheView(size=cache.size, entries=len(cache.answers), in_flight=len(cache.calls), **cache.outcomes)


@router.post("/backends", response_model=BackendView, status_code=201)
async def add_backend(spec: BackendSpec, state: State) -> BackendView:
    backend = Backend(
        url=spec.url.rstrip("/"),
        model=spec.model,
        weight=spec.weight,
        max_in_flight=state.limit(spec.max_in_flight),
        source="admin",
    )
    try:
        state.add(backend)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    return view(backend, time.monotonic())


@router.post("/backends/drain", response_model=list[BackendView])
async def drain_backend(state: State, url: Url, model: Model = None) -> list[BackendView]:
    """New requests go elsewhere at once; requests in flight on it finish."""
    found = find(state, url, model)
    for b in found:
        b.draining = True
    now = time.monotonic()
    return [view(b, now) for b in found]


@router.delete("/backends", response_model=list[BackendView])
async def remove_backend(state: State, url: Url, model: Model = None) -> list[BackendView]:
    """Drain, wait for the in-flight requests (up to the request timeout), then remove."""
    found = find(state, url, model)
    for b in found:
        await state.retire(b)
    now = time.monotonic()
    return [view(b, now) for b in found]


class LiveState:
    """A Prometheus collector: live backend and pool state, read at scrape time (nothing to keep in sync)."""

    def __init__(self, state: GatewayState):
        self.state = state

    def collect(self) -> list[GaugeMetricFamily]:
        return collect(self.state)


def collect(state: GatewayState) -> list[GaugeMetricFamily]:
    now = time.monotonic()
    in_flight = GaugeMetricFamily("eapo_gateway_backend_in_flight", "Requests in flight", labels=["model", "url"])
    up = GaugeMetricFamily("eapo_gateway_backend_available", "1 if taking new requests", labels=["model", "url"])
    requests = GaugeMetricFamily("eapo_gateway_backend_requests", "Attempts sent", labels=["model", "url"])
    errors = GaugeMetricFamily("eapo_gateway_backend_errors", "Failed attempts", labels=["model", "url"])
    queued = GaugeMetricFamily("eapo_gateway_pool_queued", "Requests waiting for a slot", labels=["model"])
    rejected = GaugeMetricFamily("eapo_gateway_pool_rejected", "Requests refused by the queue", labels=["model"])
    for b in state.pools.backends():
        labels = [b.model, b.url]
        in_flight.add_metric(labels, b.in_flight)
        up.add_metric(labels, float(b.available(now)))
        requests.add_metric(labels, b.requests)
        errors.add_metric(labels, b.errors)
    for p in state.pools.pools():
        queued.add_metric([p.model], p.waiting)
        rejected.add_metric([p.model], p.rejected)
    return [in_flight, up, requests, errors, queued, rejected]
