"""``eapo gateway``: the expert gateway's FastAPI application.

Data plane: OpenAI-compatible pass-through (``/v1/chat/completions``, ``/v1/completions``, streaming
included, ``/v1/models``) and ``/v1/consult``, which fans a batch of ≤K queries out in parallel and
answers per query (partial success is normal). A failed attempt (connection error, timeout, 5xx) is
retried on another backend of the pool within the request's deadline, never once a stream has begun;
4xx answers are the client's and pass through. A client that disconnects cancels its upstream call.
Admin API (``expert_gateway.admin``): inspect, add, drain and remove backends. Probes: ``/healthz``,
``/readyz``; Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from eapo.config import GatewayConfig
from expert_gateway import admin
from expert_gateway.pools import AllTried, Backend, NoBackend, NoHealthyBackend, Pools, QueueFull
from expert_gateway.security import REJECTED, BodyLimit, bearer_guard
from expert_gateway.state import GatewayState, State
from proto import ConsultRequest, ConsultResponse, ConsultResult

log = logging.getLogger(__name__)

REQUESTS = Counter("eapo_gateway_requests_total", "Client requests by route and outcome", ["route", "outcome"])
RETRIES = Counter("eapo_gateway_retries_total", "Attempts retried on another backend", ["model"])

JSON_HEADERS = {"Content-Type": "application/json"}
RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
T = TypeVar("T")


class UpstreamFailed(RuntimeError):
    """Every backend tried failed (or the deadline passed); carries the last reason."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its upstream call was cancelled."""


def error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


@dataclass
class Upstream:
    """A backend's answer whose headers have arrived, holding one of the backend's slots."""

    pools: Pools
    backend: Backend
    resp: aiohttp.ClientResponse
    finished: bool = False

    def done(self) -> None:
        """Give the slot back (once); the connection goes back to the pool after a full read, else it
        is closed, which is how the backend learns to stop generating."""
        if self.finished:
            return
        self.finished = True
        if self.resp.content.at_eof():
            self.resp.release()
        else:
            self.resp.close()
        self.pools.release(self.backend)


class Relay(StreamingResponse):
    """An upstream SSE stream relayed chunk by chunk. The slot is given back however the response
    ends — including a client gone before the first chunk, when the body iterator never starts."""

    def __init__(self, up: Upstream, route: str):
        super().__init__(self._chunks(up, route), status_code=up.resp.status, media_type=up.resp.content_type)
        self.up = up

    @staticmethod
    async def _chunks(up: Upstream, route: str) -> AsyncIterator[bytes]:
        async for chunk in up.resp.content.iter_any():
            yield chunk
        REQUESTS.labels(route, str(up.resp.status)).inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.up.done()


async def open_upstream(
    state: GatewayState,
    model: str,
    path: str,
    body: bytes,
    deadline: float,
    tried: set[Backend],
    episode: str | None = None,
) -> Upstream:
    """Take a slot on a backend (the pool's policy; may wait in its queue) and send; on a retryable
    failure (connection error, timeout, 5xx) try another backend of the pool — each once per round, at
    most ``max_attempts`` attempts in all (a lone survivor gets a second try), until the deadline.
    The caller calls ``done`` on the result and records the final outcome. Raises ``NoBackend``
    (unknown model, no healthy backend) or ``QueueFull`` when nothing was tried, else ``UpstreamFailed``."""
    last = "deadline passed before any attempt"
    attempts = 0
    while deadline > time.monotonic():
        try:
            backend = await state.pools.acquire(model, exclude=tried, episode=episode, deadline=deadline)
        except AllTried as exc:  # every available backend failed once: another round, if attempts remain
            if attempts >= state.config.max_attempts:
                raise UpstreamFailed(f"{last}; {exc}") from exc
            tried.clear()
            continue
        except (NoBackend, QueueFull) as exc:
            if not tried:
                raise
            raise UpstreamFailed(f"{last}; {exc}") from exc
        tried.add(backend)
        attempts += 1
        assert backend.session is not None
        handed_over = False
        t0 = time.perf_counter()
        try:
            resp = await backend.session.post(
                path,
                data=body,
                headers=JSON_HEADERS,
                timeout=aiohttp.ClientTimeout(total=deadline - time.monotonic()),
            )
            if resp.status < 500:
                backend.latencies_ms.append((time.perf_counter() - t0) * 1000)  # time to response headers
                handed_over = True
                return Upstream(state.pools, backend, resp)
            resp.close()
            last = f"{backend.url}: HTTP {resp.status}"
        except RETRYABLE as exc:
            last = f"{backend.url}: {type(exc).__name__} {exc}".strip()
        finally:
            if not handed_over:  # failed, or cancelled (client gone, shutdown): give the slot back
                state.pools.release(backend)
        state.record(backend, ok=False, reason=last)
        RETRIES.labels(model).inc()
    raise UpstreamFailed(last)


async def call_pool(
    state: GatewayState, model: str, path: str, body: bytes, deadline: float, episode: str | None = None
) -> tuple[int, bytes, str]:
    """A whole non-streaming call: a body that fails to arrive is retried on another backend too."""
    tried: set[Backend] = set()
    while True:
        up = await open_upstream(state, model, path, body, deadline, tried, episode)
        try:
            payload = await up.resp.read()
        except RETRYABLE as exc:
            state.record(up.backend, ok=False, reason=f"{up.backend.url}: {type(exc).__name__} {exc}".strip())
            RETRIES.labels(model).inc()
            continue
        finally:
            up.done()
        state.record(up.backend, ok=True)
        return up.resp.status, payload, up.resp.content_type


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (aborting the upstream request,
    which frees the expert's GPU slot) and raise ``ClientGone``. One watcher task per request."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


def upstream_error(state: GatewayState, exc: Exception, route: str) -> JSONResponse:
    """The client's answer when no backend could serve the request."""
    if isinstance(exc, NoHealthyBackend):
        REQUESTS.labels(route, "no_healthy_backend").inc()
        return error(503, str(exc), "ServiceUnavailable", **{"Retry-After": str(retry_after(state))})
    if isinstance(exc, NoBackend):
        REQUESTS.labels(route, "unknown_model").inc()
        return error(404, str(exc), "NotFoundError")
    if isinstance(exc, QueueFull):
        REQUESTS.labels(route, "queue_full").inc()
        return error(429, str(exc), "RateLimitError", **{"Retry-After": "1"})
    REQUESTS.labels(route, "upstream_failed").inc()
    return error(503, f"all backends failed: {exc}", "ServiceUnavailable", **{"Retry-After": "1"})


def retry_after(state: GatewayState) -> int:
    """Seconds until the next health check may bring a backend back."""
    return max(1, round(state.config.health_interval_s))


def parse_openai_body(body: bytes, state: GatewayState) -> tuple[dict[str, Any], str]:
    """The request as JSON and its model; raises ``ValueError`` (→ 400) or ``LimitError`` (→ 422)."""
    parsed = json.loads(body)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), str):
        raise ValueError("the body must be a JSON object with a string 'model'")
    for key in ("max_tokens", "max_completion_tokens"):
        asked = parsed.get(key)
        if isinstance(asked, int) and asked > state.config.max_tokens_limit:
            raise LimitError(f"{key}={asked} exceeds this gateway's limit of {state.config.max_tokens_limit}")
    return parsed, parsed["model"]


class LimitError(ValueError):
    pass


class CompletionBody(BaseModel):
    """What the gateway reads of an OpenAI request; every other field passes through untouched."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="pool name or alias")
    stream: bool = Field(False, description="relay the backend's SSE stream chunk by chunk")
    max_tokens: int | None = Field(None, ge=1, description="refused with 422 above gateway.max_tokens_limit")
    messages: list[dict[str, Any]] | None = Field(None, description="chat completions")
    prompt: str | list[str] | None = Field(None, description="text completions")


OPENAI_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": CompletionBody.model_json_schema()}}},
    "responses": {"404": {"description": "unknown model"}, "429": {"description": "queue full; see Retry-After"},
                  "503": {"description": "no healthy backend, or all tried failed; see Retry-After"}},
}  # fmt: skip


def create_app(config: GatewayConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = GatewayState(config)
        for b in state.pools.backends():
            b.open()
        app.state.gateway = state
        loops = [asyncio.create_task(state.health_loop())]
        if config.discovery:
            loops.append(asyncio.create_task(state.discovery_loop()))
        yield
        for task in loops + list(state.retiring):
            task.cancel()
        await asyncio.gather(*loops, *state.retiring, return_exceptions=True)
        for b in state.pools.backends():
            await b.close()

    app = FastAPI(title="eapo expert gateway", lifespan=lifespan)
    live = CollectorRegistry(auto_describe=False)
    live.register(admin.LiveState(app))
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    data_guard = bearer_guard(config.api_token, "data plane")
    data_plane = [Depends(data_guard)] if config.api_token else []

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        REJECTED.labels("invalid_schema").inc()
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(422, f"invalid request: {problems}")

    async def passthrough(request: Request, path: str, route: str) -> Response:
        await data_guard(request)
        state: GatewayState = request.app.state.gateway
        body = await request.body()
        try:
            parsed, model = parse_openai_body(body, state)
        except LimitError as exc:
            REJECTED.labels("max_tokens").inc()
            return error(422, str(exc))
        except ValueError as exc:
            REJECTED.labels("bad_request").inc()
            return error(400, f"request body must be a JSON object with a string 'model': {exc}")
        if model in state.pools.aliases:  # the backend only knows the served name
            parsed["model"] = model = state.pools.resolve(model)
            body = json.dumps(parsed).encode()
        episode = request.headers.get("x-episode-id")
        deadline = time.monotonic() + state.config.request_timeout_s
        if parsed.get("stream"):
            return await stream(request, state, model, path, body, deadline, route, episode)
        try:
            status, payload, ctype = await unless_disconnected(
                request, call_pool(state, model, path, body, deadline, episode)
            )
        except (NoBackend, UpstreamFailed, QueueFull) as exc:
            return upstream_error(state, exc, route)
        except ClientGone:
            REQUESTS.labels(route, "client_disconnected").inc()
            return Response(status_code=499)
        REQUESTS.labels(route, str(status)).inc()
        return Response(payload, status_code=status, media_type=ctype)

    async def stream(
        request: Request,
        state: GatewayState,
        model: str,
        path: str,
        body: bytes,
        deadline: float,
        route: str,
        episode: str | None,
    ) -> Response:
        """Open upstream (retrying before any byte is sent), then relay chunks as they come."""
        try:
            up = await unless_disconnected(request, open_upstream(state, model, path, body, deadline, set(), episode))
        except (NoBackend, UpstreamFailed, QueueFull) as exc:
            return upstream_error(state, exc, route)
        except ClientGone:
            REQUESTS.labels(route, "client_disconnected").inc()
            return Response(status_code=499)
        state.record(up.backend, ok=True)
        return Relay(up, route)

    @app.post("/v1/chat/completions", dependencies=data_plane, openapi_extra=OPENAI_BODY)
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, passed through to the model's pool (``stream: true`` relays SSE)."""
        return await passthrough(request, "v1/chat/completions", "chat")

    @app.post("/v1/completions", dependencies=data_plane, openapi_extra=OPENAI_BODY)
    async def completions(request: Request) -> Response:
        """OpenAI text completions, passed through to the model's pool (``stream: true`` relays SSE)."""
        return await passthrough(request, "v1/completions", "completions")

    @app.get("/v1/models", dependencies=data_plane)
    async def models(state: State) -> dict[str, Any]:
        """The union of the pools, aliases included."""
        names = state.pools.models + sorted(state.pools.aliases)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "eapo-gateway"} for m in names]}

    @app.post("/v1/consult", response_model=ConsultResponse, dependencies=data_plane)
    async def consult(req: ConsultRequest, request: Request, state: State) -> ConsultResponse | Response:
        """≤K queries of one policy turn, answered in parallel and in order; each answer or its error."""
        if len(req.queries) > state.config.max_queries:
            REJECTED.labels("too_many_queries").inc()
            return error(413, f"{len(req.queries)} queries exceed the limit of {state.config.max_queries}")
        if req.max_tokens > state.config.max_tokens_limit:
            REJECTED.labels("max_tokens").inc()
            return error(
                422, f"max_tokens={req.max_tokens} exceeds this gateway's limit of {state.config.max_tokens_limit}"
            )
        try:
            model = state.pools.pool(req.model).model
        except NoBackend as exc:
            REJECTED.labels("unknown_model").inc()
            return error(404, str(exc), "NotFoundError")
        deadline = time.monotonic() + min(req.deadline_s, state.config.request_timeout_s)
        work = asyncio.gather(*(consult_one(state, req, model, i, q, deadline) for i, q in enumerate(req.queries)))
        try:
            results = await unless_disconnected(request, work)
        except ClientGone:
            REQUESTS.labels("consult", "client_disconnected").inc()
            return Response(status_code=499)
        REQUESTS.labels("consult", "ok").inc()
        return ConsultResponse(model=req.model, results=list(results))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(state: State) -> JSONResponse:
        """Readiness: at least one backend is available."""
        now = time.monotonic()
        ready = any(b.available(now) for b in state.pools.backends())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: the process's counters and every backend's and pool's live state."""
        return Response(generate_latest() + generate_latest(live), media_type=CONTENT_TYPE_LATEST)

    # The pass-through routes are served by plain Starlette routes matched first: FastAPI's dependency
    # solving and query parsing were ~20% of a proxied request's CPU (benchmarks/gateway.py). The
    # FastAPI routes above, never matched, keep them in the OpenAPI schema. The admin routes go last so
    # that data-plane requests do not scan them.
    for path, endpoint in (("/v1/chat/completions", chat_completions), ("/v1/completions", completions)):
        app.router.routes.insert(0, Route(path, endpoint, methods=["POST"]))
    app.include_router(admin.router, prefix="/admin", dependencies=[Depends(bearer_guard(config.admin_token, "admin"))])
    return app


async def consult_one(
    state: GatewayState, req: ConsultRequest, model: str, index: int, query: str, deadline: float
) -> ConsultResult:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": query}],
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
    ).encode()
    t0 = time.perf_counter()
    try:
        # Stickiness per (episode, query slot): the K queries of a turn still spread over the pool.
        episode = None if req.episode_id is None else f"{req.episode_id}:{index}"
        status, payload, _ = await call_pool(state, model, "v1/chat/completions", body, deadline, episode)
        if status != 200:
            raise UpstreamFailed(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
        answer = json.loads(payload)["choices"][0]["message"]["content"]
        return ConsultResult(index=index, answer=answer, latency_ms=(time.perf_counter() - t0) * 1000)
    except (UpstreamFailed, NoBackend, QueueFull, ValueError, KeyError, IndexError, TypeError) as exc:
        return ConsultResult(
            index=index, error=str(exc) or type(exc).__name__, latency_ms=(time.perf_counter() - t0) * 1000
        )
