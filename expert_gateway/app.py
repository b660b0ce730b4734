"""``eapo gateway``: the expert gateway's FastAPI application.

Data plane: OpenAI-compatible pass-through (``/v1/chat/completions``, ``/v1/completions``, streaming
included, ``/v1/models``) and ``/v1/consult``, which fans a batch of ≤K queries out in parallel and
answers per query (partial success is normal). Inspection: ``/admin/backends``, ``/healthz``,
``/readyz``, ``/metrics``. A failed attempt (connection error, timeout, 5xx) is retried on another
backend of the pool within the request's deadline; 4xx answers are the client's and pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel

from eapo.config import GatewayConfig
from expert_gateway.pools import Backend, NoBackend, NoHealthyBackend, Pools
from proto import ConsultRequest, ConsultResponse, ConsultResult

log = logging.getLogger(__name__)

REQUESTS = Counter("eapo_gateway_requests_total", "Client requests by route and outcome", ["route", "outcome"])
RETRIES = Counter("eapo_gateway_retries_total", "Attempts retried on another backend", ["model"])
REJECTED = Counter("eapo_gateway_rejected_total", "Requests rejected before routing", ["reason"])

RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class UpstreamFailed(RuntimeError):
    """Every backend tried failed (or the deadline passed); carries the last reason."""


class BackendView(BaseModel):
    url: str
    model: str
    state: str  # "available", "unhealthy" (failed its last check) or "ejected" (after failed requests)
    in_flight: int
    requests: int
    errors: int
    consecutive_failures: int
    latency_ms: dict[str, float | None]
    ejections: list[dict]


class GatewayState:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.pools = Pools([Backend(url=b.url, model=b.model) for b in config.backends])

    def record(self, backend: Backend, ok: bool, reason: str = "") -> None:
        backend.record(ok, self.config.eject_after_failures, self.config.eject_s, reason)

    async def health_loop(self) -> None:
        """Active checks of every backend, forever (cancelled at shutdown)."""
        while True:
            await asyncio.gather(*(b.check() for b in self.pools.backends()))
            await asyncio.sleep(self.config.health_interval_s)


def error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


async def open_upstream(
    state: GatewayState, model: str, path: str, body: bytes, deadline: float, tried: set[Backend]
) -> tuple[AsyncExitStack, Backend, aiohttp.ClientResponse]:
    """Lease the least-loaded available backend and send; on a retryable failure (connection error,
    timeout, 5xx) try another backend of the pool, until the deadline. Returns the response with its
    headers read; the caller owns the stack (lease + response) and records the final outcome.
    Raises ``NoBackend`` (unknown model, or no healthy backend) when nothing was tried, else ``UpstreamFailed``."""
    last = "deadline passed before any attempt"
    while (remaining := deadline - time.monotonic()) > 0:
        stack = AsyncExitStack()
        try:
            backend = await stack.enter_async_context(state.pools.lease(model, exclude=tried))
        except NoBackend as exc:
            if not tried:
                raise
            raise UpstreamFailed(f"{last}; {exc}") from exc
        tried.add(backend)
        assert backend.session is not None
        t0 = time.perf_counter()
        try:
            resp = await stack.enter_async_context(
                backend.session.post(
                    path,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=remaining),
                )
            )
        except RETRYABLE as exc:
            last = f"{backend.url}: {type(exc).__name__} {exc}".strip()
        else:
            if resp.status < 500:
                backend.latencies_ms.append((time.perf_counter() - t0) * 1000)  # time to response headers
                return stack, backend, resp
            last = f"{backend.url}: HTTP {resp.status}"
        state.record(backend, ok=False, reason=last)
        RETRIES.labels(model).inc()
        await stack.aclose()
    raise UpstreamFailed(last)


async def call_pool(state: GatewayState, model: str, path: str, body: bytes, deadline: float) -> tuple[int, bytes, str]:
    """A whole non-streaming call: a body that fails to arrive is retried on another backend too."""
    tried: set[Backend] = set()
    while True:
        stack, backend, resp = await open_upstream(state, model, path, body, deadline, tried)
        async with stack:
            try:
                payload = await resp.read()
            except RETRYABLE as exc:
                state.record(backend, ok=False, reason=f"{backend.url}: {type(exc).__name__} {exc}".strip())
                RETRIES.labels(model).inc()
                continue
        state.record(backend, ok=True)
        return resp.status, payload, resp.content_type


def upstream_error(state: GatewayState, exc: Exception, route: str) -> JSONResponse:
    """The client's answer when no backend could serve the request."""
    if isinstance(exc, NoHealthyBackend):
        REQUESTS.labels(route, "no_healthy_backend").inc()
        return error(503, str(exc), "ServiceUnavailable", **{"Retry-After": str(retry_after(state))})
    if isinstance(exc, NoBackend):
        REQUESTS.labels(route, "unknown_model").inc()
        return error(404, str(exc), "NotFoundError")
    REQUESTS.labels(route, "upstream_failed").inc()
    return error(503, f"all backends failed: {exc}", "ServiceUnavailable", **{"Retry-After": "1"})


def retry_after(state: GatewayState) -> int:
    """Seconds until the next health check may bring a backend back."""
    return max(1, round(state.config.health_interval_s))


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState(config)
        for b in state.pools.backends():
            b.open()
        app.state.gateway = state
        checks = asyncio.create_task(state.health_loop())
        yield
        checks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checks
        for b in state.pools.backends():
            await b.close()

    app = FastAPI(title="eapo expert gateway", lifespan=lifespan)

    async def passthrough(request: Request, state: GatewayState, path: str, route: str) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body)
            model = parsed["model"]
            if not isinstance(model, str):
                raise TypeError("model must be a string")
        except (ValueError, KeyError, TypeError) as exc:
            REJECTED.labels("bad_request").inc()
            return error(400, f"request body must be a JSON object with a string 'model': {exc}")
        deadline = time.monotonic() + state.config.request_timeout_s
        if parsed.get("stream"):
            return await stream(state, model, path, body, deadline, route)
        try:
            status, payload, ctype = await call_pool(state, model, path, body, deadline)
        except (NoBackend, UpstreamFailed) as exc:
            return upstream_error(state, exc, route)
        REQUESTS.labels(route, str(status)).inc()
        return Response(payload, status_code=status, media_type=ctype)

    async def stream(state: GatewayState, model: str, path: str, body: bytes, deadline: float, route: str) -> Response:
        """Open upstream (retrying before any byte is sent), then relay chunks as they come."""
        try:
            stack, backend, resp = await open_upstream(state, model, path, body, deadline, set())
        except (NoBackend, UpstreamFailed) as exc:
            return upstream_error(state, exc, route)
        state.record(backend, ok=True)

        async def relay() -> AsyncIterator[bytes]:
            async with stack:  # lease and upstream released on end, error or client disconnect
                async for chunk in resp.content.iter_any():
                    yield chunk
            REQUESTS.labels(route, str(resp.status)).inc()

        return StreamingResponse(relay(), status_code=resp.status, media_type=resp.content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, state: State) -> Response:
        return await passthrough(request, state, "v1/chat/completions", "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, state: State) -> Response:
        return await passthrough(request, state, "v1/completions", "completions")

    @app.get("/v1/models")
    async def models(state: State) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "owned_by": "eapo-gateway"} for m in state.pools.models],
        }

    @app.post("/v1/consult", response_model=ConsultResponse)
    async def consult(req: ConsultRequest, state: State) -> ConsultResponse | JSONResponse:
        if len(req.queries) > state.config.max_queries:
            REJECTED.labels("too_many_queries").inc()
            return error(413, f"{len(req.queries)} queries exceed the limit of {state.config.max_queries}")
        if req.model not in state.pools.models:
            REJECTED.labels("unknown_model").inc()
            return error(404, f"unknown model {req.model!r}; served: {', '.join(state.pools.models)}", "NotFoundError")
        deadline = time.monotonic() + min(req.deadline_s, state.config.request_timeout_s)
        results = await asyncio.gather(*(consult_one(state, req, i, q, deadline) for i, q in enumerate(req.queries)))
        REQUESTS.labels("consult", "ok").inc()
        return ConsultResponse(model=req.model, results=list(results))

    @app.get("/admin/backends", response_model=list[BackendView])
    async def backends(state: State) -> list[BackendView]:
        now = time.monotonic()
        return [
            BackendView(
                url=b.url,
                model=b.model,
                state="available" if b.available(now) else ("ejected" if now < b.ejected_until else "unhealthy"),
                in_flight=b.in_flight,
                requests=b.requests,
                errors=b.errors,
                consecutive_failures=b.consecutive_failures,
                latency_ms=b.latency_percentiles(),
                ejections=list(b.ejections),
            )
            for b in state.pools.backends()
        ]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(state: State) -> JSONResponse:
        now = time.monotonic()
        ready = any(b.available(now) for b in state.pools.backends())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def consult_one(
    state: GatewayState, req: ConsultRequest, index: int, query: str, deadline: float
) -> ConsultResult:
    body = json.dumps(
        {
            "model": req.model,
            "messages": [{"role": "user", "content": query}],
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
    ).encode()
    t0 = time.perf_counter()
    try:
        status, payload, _ = await call_pool(state, req.model, "v1/chat/completions", body, deadline)
        if status != 200:
            raise UpstreamFailed(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
        answer = json.loads(payload)["choices"][0]["message"]["content"]
        return ConsultResult(index=index, answer=answer, latency_ms=(time.perf_counter() - t0) * 1000)
    except (UpstreamFailed, NoBackend, ValueError, KeyError, IndexError, TypeError) as exc:
        return ConsultResult(
            index=index, error=str(exc) or type(exc).__name__, latency_ms=(time.perf_counter() - t0) * 1000
        )
