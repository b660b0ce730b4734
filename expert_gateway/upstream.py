"""The gateway's HTTP/1.1 client to one backend: a keep-alive connection pool with no connection cap.

Why not aiohttp's client: at 256 concurrent requests it cost ~125 µs of CPU per proxied request on
this machine, against ~30 µs for this module (docs/decisions.md) — with one gateway worker that is the
difference between a quarter of vllm-router's throughput and matching it. Parsing is httptools (llhttp,
uvicorn's parser); this module only writes requests and keeps connections, so it stays small:

* requests carry a complete body (``Content-Length``); responses may be sized or chunked;
* an idle connection is reused newest-first and dropped after ``idle_timeout_s`` (below uvicorn's and
  vLLM's 5 s keep-alive, so the server rarely closes one under us); a reused connection that dies
  before any response byte is retried once on a new connection — the server never saw the request;
* a response that is not read to its end (client gone, cancelled, timed out) closes its connection,
  which is how a vLLM server learns to stop generating;
* a body that arrives faster than it is relayed pauses the socket above ``HIGH_WATER`` bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 18  # bytes of unread body per connection before its socket pauses
DEFAULT_TYPE = b"application/json"  # a response without Content-Type


class UpstreamError(ConnectionError):
    """The backend could not be reached, broke the connection, sent garbage or ran out of time."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    def __init__(self, pool: HttpPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[int] | None = None  # resolves with the status when the headers are in
        self.wakeup: asyncio.Future[None] | None = None  # a reader waiting for more body
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.content_type = DEFAULT_TYPE
        self.received = False  # any byte of the current response
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.closed = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, request: bytes, deadline: float) -> asyncio.Future[int]:
        self.head = loop.create_future()
        self.chunks.clear()
        self.buffered, self.content_type, self.error = 0, DEFAULT_TYPE, None
        self.received = self.complete = self.keep_alive = False
        self.timer = loop.call_at(deadline, self.fail, UpstreamError("timed out"))
        self.transport.write(request)
        return self.head

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head is None:  # idle: the server closed it (its keep-alive ran out)
            self.pool.forget(self)
        elif not self.complete:
            self.fail(UpstreamError(f"connection lost{f': {exc}' if exc else ''}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    def fail(self, exc: Exception) -> None:
        """End the current exchange with ``exc``; the connection is not reused."""
        if self.complete or self.error is not None:
            return
        self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= HIGH_WATER // 2:
            self.paused = False
            self.transport.resume_reading()
        return chunk


class BackendResponse:
    """A backend's answer whose headers have arrived. Read it (``read`` or ``chunks``) and ``release``
    it exactly once: a fully read response returns its connection to the pool, any other closes it."""

    __slots__ = ("_conn", "content_type", "status")

    def __init__(self, conn: Connection, status: int):
        self.status, self.content_type, self._conn = status, conn.content_type, conn

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            while conn.chunks:
                yield conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return
            conn.wakeup = asyncio.get_running_loop().create_future()
            await conn.wakeup

    async def read(self) -> bytes:
        conn = self._conn
        if conn.complete:  # the usual case: the body came in the same segment as the headers
            body = b"".join(conn.chunks)
            conn.chunks.clear()
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        conn = self._conn
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.complete and conn.keep_alive and not conn.chunks and not conn.closed:
            conn.pool.park(conn)
        else:
            conn.pool.discard(conn)


class HttpPool:
    """Every connection to one backend (``http://host:port[/prefix]``; https too)."""

    def __init__(self, url: str, idle_timeout_s: float = 4.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend URL must be http(s)://host[:port][/prefix], got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/") + "/"
        self.host_header = parts.netloc.encode()
        self.idle_timeout_s = idle_timeout_s
        self.idle: list[Connection] = []  # newest last
        self.open: set[Connection] = set()

    def _request_bytes(self, method: str, path: str, body: bytes) -> bytes:
        target = (self.prefix + path.lstrip("/")).encode()
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), target, self.host_header)
        if body or method == "POST":
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        return head + b"\r\n" + body

    async def request(self, method: str, path: str, body: bytes = b"", timeout_s: float = 60.0) -> BackendResponse:
        """Send and wait for the response's headers. Raises ``UpstreamError`` (retryable: connection,
        protocol or time) — never a half-consumed connection. Cancelling closes the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        request = self._request_bytes(method, path, body)
        conn, reused = self._reuse()
        for attempt in range(2):
            if conn is None:
                conn, reused = await self._connect(deadline), False
            try:
                status = await conn.start(loop, request, deadline)
            except UpstreamError:
                stale = reused and not conn.received and attempt == 0 and loop.time() < deadline
                self.discard(conn)
                if not stale:
                    raise
                conn = None  # the server closed an idle connection under us: it never saw the request
                continue
            except BaseException:  # cancelled: the client is gone, or shutdown
                conn.fail(UpstreamError("cancelled"))
                self.discard(conn)
                raise
            return BackendResponse(conn, status)
        raise AssertionError("unreachable")

    def _reuse(self) -> tuple[Connection | None, bool]:
        expired = time.monotonic() - self.idle_timeout_s
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.idle_since > expired:
                return conn, True
            self.discard(conn)
        return None, False

    async def _connect(self, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(lambda: Connection(self), self.host, self.port, ssl=self.ssl)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"connect to {self.host}:{self.port}: {type(exc).__name__} {exc}".rstrip()) from exc
        self.open.add(conn)
        return conn

    def park(self, conn: Connection) -> None:
        conn.head = conn.wakeup = None
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self.open.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def discard(self, conn: Connection) -> None:
        self.open.discard(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.transport is not None and not conn.closed:
            conn.transport.abort()

    def close(self) -> None:
        """Close every connection, in flight or idle (their requests fail with ``UpstreamError``)."""
        for conn in list(self.open):
            conn.fail(UpstreamError("backend removed"))
            self.discard(conn)
        self.idle.clear()
