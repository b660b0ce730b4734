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

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from eapo.core.config import GatewayConfig
from eapo.core.metrics import labelled
from expert_gateway import admin
from expert_gateway.degrade import degrade
from expert_gateway.pools import AllTried, Backend, NoBackend, NoHealthyBackend, Pools, QueueFull
from expert_gateway.security import REJECTED, BearerToken, BodyLimit, bearer_guard
from expert_gateway.state import GatewayState, State
from expert_gateway.upstream import BackendResponse, UpstreamError
from proto import ConsultRequest, ConsultResponse, ConsultResult

log = logging.getLogger(__name__)

REQUESTS = Counter("eapo_gateway_requests_total", "Client requests by route and outcome", ["route", "outcome"])
RETRIES = Counter("eapo_gateway_retries_total", "Attempts retried on another backend", ["model"])

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
    resp: BackendResponse
    finished: bool = False

    def done(self) -> None:
        """Give the slot back (once); the connection goes back to the pool after a full read, else it
        is closed, which is how the backend learns to stop generating."""
        if self.finished:
            return
        self.finished = True
        self.resp.release()
        self.pools.release(self.backend)


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
        assert backend.http is not None
        handed_over = False
        t0 = time.perf_counter()
        try:
            resp = await backend.http.request("POST", path, body, timeout_s=deadline - time.monotonic())
            if resp.status < 500:
                backend.latencies_ms.append((time.perf_counter() - t0) * 1000)  # time to response headers
                handed_over = True
                return Upstream(state.pools, backend, resp)
            resp.release()
            last = f"{backend.url}: HTTP {resp.status}"
        except UpstreamError as exc:
            last = f"{backend.url}: {exc}"
        finally:
            if not handed_over:  # failed, or cancelled (client gone, shutdown): give the slot back
                state.pools.release(backend)
        state.record(backend, ok=False, reason=last)
        RETRIES.labels(model).inc()
    raise UpstreamFailed(last)


async def call_pool(
    state: GatewayState, model: str, path: str, body: bytes, deadline: float, episode: str | None = None
) -> tuple[int, bytes, bytes]:
    """A whole non-streaming call: a body that fails to arrive is retried on another backend too."""
    tried: set[Backend] = set()
    while True:
        up = await open_upstream(state, model, path, body, deadline, tried, episode)
        try:
            payload = await up.resp.read()
        except UpstreamError as exc:
            state.record(up.backend, ok=False, reason=f"{up.backend.url}: {exc}")
            RETRIES.labels(model).inc()
            continue
        finally:
            up.done()
        state.record(up.backend, ok=True)
        return up.resp.status, payload, up.resp.content_type


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (aborting the upstream request,
    which frees the expert's GPU slot) and raise ``ClientGone``. One watcher task per request; the
    request body must have been read already."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
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
        labelled(REQUESTS, route, "no_healthy_backend").inc()
        return error(503, str(exc), "ServiceUnavailable", **{"Retry-After": str(retry_after(state))})
    if isinstance(exc, NoBackend):
        labelled(REQUESTS, route, "unknown_model").inc()
        return error(404, str(exc), "NotFoundError")
    if isinstance(exc, QueueFull):
        labelled(REQUESTS, route, "queue_full").inc()
        return error(429, str(exc), "RateLimitError", **{"Retry-After": "1"})
    labelled(REQUESTS, route, "upstream_failed").inc()
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


PASSTHROUGH = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}  # path → route label


async def read_body(receive: Receive) -> bytes:
    """The whole request body (``BodyLimit`` has already bounded it)."""
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    if message["type"] == "http.disconnect":
        raise ClientGone
    return body


async def relay(
    state: GatewayState, model: str, path: str, body: bytes, deadline: float, episode: str | None, send: Send
) -> Upstream:
    """Open upstream (retrying before any byte is sent), then relay its SSE chunks as they come. The
    caller ends the response and gives the slot back."""
    up = await open_upstream(state, model, path, body, deadline, set(), episode)
    try:
        state.record(up.backend, ok=True)
        headers = [(b"content-type", up.resp.content_type)]
        await send({"type": "http.response.start", "status": up.resp.status, "headers": headers})
        async for chunk in up.resp.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except BaseException:
        up.done()
        raise
    return up


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, with the two OpenAI pass-through routes served straight on ASGI.

    Proxying is the hot path, and FastAPI's middleware stack, routing and request objects cost about
    as much CPU as the proxying itself (docs/decisions.md). ``__call__`` hands those routes to
    ``passthrough`` (behind the same body limit) before FastAPI sees the request; they are declared as
    FastAPI routes too, for the OpenAPI schema only. Everything else is plain FastAPI."""

    def __init__(self, config: GatewayConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.data_token = BearerToken(config.api_token, "data plane")
        self.admin_token = BearerToken(config.admin_token, "admin")
        self.fast = BodyLimit(self.passthrough, max_bytes=config.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PASSTHROUGH:
            await self.fast(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An OpenAI request passed through to the model's pool; ``stream: true`` relays SSE."""
        route, path = PASSTHROUGH[scope["path"]], scope["path"][1:]
        state: GatewayState = self.state.gateway
        headers = dict(scope["headers"])
        if not self.data_token.admits(headers.get(b"authorization")):
            reply = error(401, self.data_token.refusal, "AuthenticationError", **{"WWW-Authenticate": "Bearer"})
            return await reply(scope, receive, send)
        try:
            body = await read_body(receive)
            parsed, model = parse_openai_body(body, state)
        except ClientGone:
            labelled(REQUESTS, route, "client_disconnected").inc()
            return
        except LimitError as exc:
            REJECTED.labels("max_tokens").inc()
            return await error(422, str(exc))(scope, receive, send)
        except ValueError as exc:
            REJECTED.labels("bad_request").inc()
            reply = error(400, f"request body must be a JSON object with a string 'model': {exc}")
            return await reply(scope, receive, send)
        if model in state.pools.aliases:  # the backend only knows the served name
            parsed["model"] = model = state.pools.resolve(model)
            body = json.dumps(parsed).encode()
        episode = headers.get(b"x-episode-id")
        episode_id = episode.decode("latin-1") if episode is not None else None
        deadline = time.monotonic() + state.config.request_timeout_s
        try:
            if parsed.get("stream"):
                up = await unless_disconnected(receive, relay(state, model, path, body, deadline, episode_id, send))
                try:
                    await send({"type": "http.response.body", "body": b""})
                finally:
                    up.done()
                labelled(REQUESTS, route, str(up.resp.status)).inc()
                return
            work = call_pool(state, model, path, body, deadline, episode_id)
            status, payload, ctype = await unless_disconnected(receive, work)
        except (NoBackend, UpstreamFailed, QueueFull) as exc:  # raised before any byte went to the client
            return await upstream_error(state, exc, route)(scope, receive, send)
        except ClientGone:
            labelled(REQUESTS, route, "client_disconnected").inc()
            return
        except UpstreamError:  # the backend broke off a stream: the client's connection is closed too
            labelled(REQUESTS, route, "stream_broken").inc()
            raise
        labelled(REQUESTS, route, str(status)).inc()
        length = b"%d" % len(payload)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", length)]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})


def create_app(config: GatewayConfig) -> GatewayApp:
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
            b.close()

    app = GatewayApp(config, title="eapo expert gateway", lifespan=lifespan)
    live = CollectorRegistry(auto_describe=False)
    live.register(admin.LiveState(app))
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    data_plane = [Depends(bearer_guard(app.data_token))] if config.api_token else []

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """One error shape for the whole gateway (OpenAI's), also for FastAPI's own refusals."""
        kind = {401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError"}.get(exc.status_code)
        return error(exc.status_code, str(exc.detail), kind or "invalid_request_error", **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        REJECTED.labels("invalid_schema").inc()
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(422, f"invalid request: {problems}")

    async def served_by_passthrough() -> None:
        """Never called: ``GatewayApp.__call__`` serves this path before FastAPI routes."""
        raise AssertionError("GatewayApp.__call__ serves the pass-through routes")

    for path, doc in (
        ("/v1/chat/completions", "OpenAI chat completions, passed through to the model's pool"),
        ("/v1/completions", "OpenAI text completions, passed through to the model's pool"),
    ):
        app.add_api_route(
            path,
            served_by_passthrough,
            methods=["POST"],
            dependencies=data_plane,
            openapi_extra=OPENAI_BODY,
            summary=doc.split(",")[0],
            description=f"{doc} (``stream: true`` relays SSE chunk by chunk).",
            operation_id=PASSTHROUGH[path],
        )

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
            results = await unless_disconnected(request.receive, work)
        except ClientGone:
            labelled(REQUESTS, "consult", "client_disconnected").inc()
            return Response(status_code=499)
        labelled(REQUESTS, "consult", "ok").inc()
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

    admin_guard = Depends(bearer_guard(app.admin_token))
    app.include_router(admin.router, prefix="/admin", dependencies=[admin_guard])
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
        if (setting := state.config.degrade.get(model)) is not None:
            answer = degrade(setting, model, answer, state.config.seed, f"{req.episode_id}:{index}:{query}")
        return ConsultResult(index=index, answer=answer, latency_ms=(time.perf_counter() - t0) * 1000)
    except (UpstreamFailed, NoBackend, QueueFull, ValueError, KeyError, IndexError, TypeError) as exc:
        return ConsultResult(
            index=index, error=str(exc) or type(exc).__name__, latency_ms=(time.perf_counter() - t0) * 1000
        )
