"""Bearer tokens and request-size limits: refused before any routing work, each refusal counted.

Tokens are optional and separate for the data plane (``/v1/*``) and the admin API (``/admin/*``);
they are compared in constant time. The body limit is an ASGI middleware so that it also covers the
routes whose bodies FastAPI parses itself, and it stops reading at the limit instead of buffering an
oversized upload.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request
from prometheus_client import Counter
from pydantic import SecretStr

from eapo.core.http import openai_error

REJECTED = Counter("eapo_gateway_rejected_total", "Requests rejected before routing", ["reason"])


class BearerToken:
    """``Authorization: Bearer <token>`` against one expected token (none: everyone is admitted)."""

    def __init__(self, token: SecretStr | None, scope: str):
        self.expected = token.get_secret_value().encode() if token is not None else None
        self.scope = scope

    def admits(self, authorization: str | bytes | None) -> bool:
        """True if admitted; a refusal is counted."""
        if self.expected is None:
            return True
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.expected):
            return True
        REJECTED.labels(f"unauthorized_{self.scope}").inc()
        return False

    @property
    def refusal(self) -> str:
        return f"missing or wrong bearer token for the {self.scope} API"


def bearer_guard(token: BearerToken) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that admits a request only with the right bearer token."""

    async def guard(request: Request) -> None:
        if not token.admits(request.headers.get("authorization")):
            raise HTTPException(401, token.refusal, headers={"WWW-Authenticate": "Bearer"})

    return guard


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 (by Content-Length, or while reading)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit():  # the HTTP server holds the body to this length
            if int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send, int(declared))
            return await self.app(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send, seen)

    async def _refuse(self, scope, receive, send, size: int) -> None:
        REJECTED.labels("body_too_large").inc()
        message = f"request body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes"
        await openai_error(413, message)(scope, receive, send)


class _TooLarge(Exception):
    pass
