"""``eapo gateway``: the expert gateway's FastAPI application, put together.

The routes live in ``expert_gateway.routes`` (data plane, probes) and ``expert_gateway.admin`` (the
admin API); forwarding to the backends, retries and failover in ``expert_gateway.forward``; the state
they share (pools, health and discovery loops) in ``expert_gateway.state``, created for the app's
lifespan and handed to handlers by dependency injection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from eapo.core.config import GatewayConfig
from eapo.core.http import openai_error
from expert_gateway import admin, routes
from expert_gateway.forward import PASSTHROUGH, Passthrough
from expert_gateway.security import REJECTED, BearerToken, BodyLimit, bearer_guard
from expert_gateway.state import GatewayState


class GatewayApp(FastAPI):
    """FastAPI, but the OpenAI pass-through routes go to ``forward.Passthrough`` (behind the same body
    limit) before FastAPI sees the request: they are the hot path, and FastAPI's middleware, routing
    and request objects cost about as much CPU as the proxying itself (docs/decisions.md)."""

    def __init__(self, config: GatewayConfig, data_token: BearerToken, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.passthrough = BodyLimit(Passthrough(self, data_token), max_bytes=config.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PASSTHROUGH:
            await self.passthrough(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


@asynccontextmanager
async def lifespan(app: GatewayApp) -> AsyncIterator[None]:
    """The shared state for the app's lifetime: backends connected, health checks (and discovery) running."""
    state = GatewayState(app.config)
    for b in state.pools.backends():
        b.open()
    app.state.gateway = state
    loops = [asyncio.create_task(state.health_loop())]
    if app.config.discovery:
        loops.append(asyncio.create_task(state.discovery_loop()))
    yield
    for task in loops + list(state.retiring):
        task.cancel()
    await asyncio.gather(*loops, *state.retiring, return_exceptions=True)
    for b in state.pools.backends():
        b.close()


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """One error shape for the whole gateway (OpenAI's), also for FastAPI's own refusals."""
    kind = {401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError"}.get(exc.status_code)
    return openai_error(exc.status_code, str(exc.detail), kind or "invalid_request_error", exc.headers)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    REJECTED.labels("invalid_schema").inc()
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return openai_error(422, f"invalid request: {problems}")


def create_app(config: GatewayConfig) -> GatewayApp:
    """The gateway for ``config``; each of its two bearer tokens guards its plane only when set."""
    data_token = BearerToken(config.api_token, "data plane")
    app = GatewayApp(config, data_token, title="eapo expert gateway", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    data_plane = [Depends(bearer_guard(data_token))] if config.api_token else []
    app.include_router(routes.v1, dependencies=data_plane)
    app.include_router(routes.probes)
    admin_guard = Depends(bearer_guard(BearerToken(config.admin_token, "admin")))
    app.include_router(admin.router, prefix="/admin", dependencies=[admin_guard])
    return app
