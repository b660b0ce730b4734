"""Forwarding one request to its pool: the OpenAI pass-through, retry and failover, SSE relayed.

A failed attempt (connection error, timeout, 5xx) is retried on another backend of the pool within the
request's deadline, never once a stream has begun; 4xx answers are the client's and pass through. A
client that disconnects cancels its upstream call, which frees the expert's GPU slot. When no backend
can serve a request, the client gets an OpenAI error body saying why, with ``Retry-After`` where
waiting helps.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.types import Receive, Scope, Send

from eapo.core.http import openai_error
from eapo.core.metrics import labelled
from expert_gateway.pools import AllTried, Backend, NoBackend, NoHealthyBackend, Pools, QueueFull
from expert_gateway.security import REJECTED, BearerToken
from expert_gateway.state import GatewayState
from expert_gateway.upstream import BackendResponse, UpstreamError

REQUESTS = Counter("eapo_gateway_requests_total", "Client requests by route and outcome", ["route", "outcome"])
RETRIES = Counter("eapo_gateway_retries_total", "Attempts retried on another backend", ["model"])

PASSTHROUGH = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}  # path → route label

T = TypeVar("T")


class UpstreamFailed(RuntimeError):
    """Every backend tried failed (or the deadline passed); carries the last reason."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its upstream call was cancelled."""


class LimitError(ValueError):
    """A well-formed request that asks for more than this gateway allows (→ 422, not 400)."""


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
        return openai_error(503, str(exc), "ServiceUnavailable", {"Retry-After": str(retry_after(state))})
    if isinstance(exc, NoBackend):
        labelled(REQUESTS, route, "unknown_model").inc()
        return openai_error(404, str(exc), "NotFoundError")
    if isinstance(exc, QueueFull):
        labelled(REQUESTS, route, "queue_full").inc()
        return openai_error(429, str(exc), "RateLimitError", {"Retry-After": "1"})
    labelled(REQUESTS, route, "upstream_failed").inc()
    return openai_error(503, f"all backends failed: {exc}", "ServiceUnavailable", {"Retry-After": "1"})


def retry_after(state: GatewayState) -> int:
    """Seconds until the next health check may bring a backend back."""
    return max(1, round(state.config.health_interval_s))


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


class Passthrough:
    """The OpenAI pass-through routes (``PASSTHROUGH``) as a bare ASGI app: an OpenAI request passed
    through to its model's pool, ``stream: true`` relayed as SSE.

    Proxying is the hot path, and FastAPI's middleware stack, routing and request objects cost about as
    much CPU as the proxying itself (docs/decisions.md), so this reads the app's state directly instead
    of by dependency injection."""

    def __init__(self, app: FastAPI, token: BearerToken):
        self.app, self.token = app, token  # the app's state.gateway exists once its lifespan has begun

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, path = PASSTHROUGH[scope["path"]], scope["path"][1:]
        state: GatewayState = self.app.state.gateway
        headers = dict(scope["headers"])
        if not self.token.admits(headers.get(b"authorization")):
            reply = openai_error(401, self.token.refusal, "AuthenticationError", {"WWW-Authenticate": "Bearer"})
            return await reply(scope, receive, send)
        try:
            body = await read_body(receive)
            parsed, model = parse_openai_body(body, state)
        except ClientGone:
            labelled(REQUESTS, route, "client_disconnected").inc()
            return
        except LimitError as exc:
            REJECTED.labels("max_tokens").inc()
            return await openai_error(422, str(exc))(scope, receive, send)
        except ValueError as exc:
            REJECTED.labels("bad_request").inc()
            reply = openai_error(400, f"request body must be a JSON object with a string 'model': {exc}")
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
