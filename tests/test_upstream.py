"""The gateway's upstream HTTP/1.1 client against scripted asyncio servers on loopback: keep-alive,
stale connections, chunked streaming, back-pressure, time-outs, cancellation and malformed answers."""

import asyncio
import contextlib

import pytest

from expert_gateway.upstream import HIGH_WATER, HttpPool, UpstreamError

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """A loopback TCP server whose ``handle(reader, writer, n)`` answers its n-th connection."""

    def __init__(self, handle):
        self.handle, self.connections, self.closed = handle, 0, asyncio.Event()

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handle(reader, writer, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # the client went away, or the test is over
            finally:
                writer.close()
                self.closed.set()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await reader.readexactly(length)


async def until(predicate, timeout_s: float = 30.0) -> None:
    """Let the loop run until ``predicate()``, however slow the machine (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def answer_forever(reader, writer, n) -> None:
    while True:
        await read_request(reader)
        writer.write(OK)


async def test_keep_alive_reuses_one_connection_and_sends_a_sized_body():
    seen = []

    async def handle(reader, writer, n):
        while True:
            seen.append(await read_request(reader))
            writer.write(OK)

    async with Server(handle) as url:
        pool = HttpPool(url + "/prefix")
        for _ in range(3):
            resp = await pool.request("POST", "v1/chat/completions", b'{"a": 1}')
            assert (resp.status, resp.content_type, await resp.read()) == (200, b"application/json", b"{}")
            resp.release()
        pool.close()
    assert len(seen) == 3 and seen[0].startswith(b"POST /prefix/v1/chat/completions HTTP/1.1\r\n")
    assert b"Content-Length: 8\r\n" in seen[0] and seen[0].endswith(b'{"a": 1}')


async def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one():
    """The server closes an idle connection just as the next request goes out on it (keep-alive ran
    out): the request never reached it, so it is sent again on a new connection."""

    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(OK)
        if n == 1:
            await read_request(reader)  # ... and closes without answering
            return
        await answer_forever(reader, writer, n)

    async with Server(handle) as url:
        pool = HttpPool(url)
        for _ in range(2):
            resp = await pool.request("GET", "health")
            assert resp.status == 200
            await resp.read()
            resp.release()
        pool.close()


async def test_a_fresh_connection_that_dies_is_an_error_not_a_retry():
    async def handle(reader, writer, n):
        await read_request(reader)

    server = Server(handle)
    async with server as url:
        with pytest.raises(UpstreamError, match="connection lost"):
            await HttpPool(url).request("POST", "v1/completions", b"{}")
    assert server.connections == 1


async def test_chunked_stream_is_relayed_as_it_comes():
    second = asyncio.Event()

    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: a\r\n")
        await second.wait()  # the first chunk must reach the reader before this one is sent
        writer.write(b"7\r\ndata: b\r\n0\r\n\r\n")
        await reader.read()

    async with Server(handle) as url:
        pool = HttpPool(url)
        resp = await pool.request("POST", "v1/completions", b"{}")
        assert resp.content_type == b"text/event-stream"
        got = []
        async for chunk in resp.chunks():
            got.append(chunk)
            second.set()
        resp.release()
        assert got == [b"data: a", b"data: b"] and len(pool.idle) == 1


async def test_a_large_body_pauses_the_socket_and_arrives_whole():
    body = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await reader.read()

    async with Server(handle) as url:
        pool = HttpPool(url)
        resp = await pool.request("GET", "big")
        (conn,) = pool.open
        await until(lambda: conn.paused)  # the whole body is sent; unread, it stops at the high-water mark
        assert conn.paused and conn.buffered <= 2 * HIGH_WATER  # the mark plus at most one socket read
        assert await resp.read() == body and not conn.paused
        resp.release()


async def test_time_out_closes_the_connection():
    server = Server(lambda reader, writer, n: reader.read())
    async with server as url:
        pool = HttpPool(url)
        with pytest.raises(UpstreamError, match="timed out"):
            await pool.request("POST", "v1/completions", b"{}", timeout_s=0.2)
        await asyncio.wait_for(server.closed.wait(), 30)
        assert not pool.open and not pool.idle


async def test_cancelling_a_request_closes_its_connection():
    """How a vLLM server learns that the client is gone and stops generating."""
    server = Server(lambda reader, writer, n: reader.read())
    async with server as url:
        pool = HttpPool(url)
        task = asyncio.create_task(pool.request("POST", "v1/completions", b"{}"))
        await until(lambda: server.connections == 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 30)
        assert not pool.open


async def test_an_unread_response_is_not_reused():
    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")  # never finished
        await reader.read()

    async with Server(handle) as url:
        pool = HttpPool(url)
        resp = await pool.request("GET", "x")
        resp.release()
        assert not pool.idle and not pool.open


@pytest.mark.parametrize(
    "reply, match",
    [
        (b"NOT HTTP\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}", "connection lost"),
    ],
)
async def test_garbage_and_short_bodies_are_errors(reply, match):
    async def handle(reader, writer, n):
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with Server(handle) as url:
        with pytest.raises(UpstreamError, match=match):
            resp = await HttpPool(url).request("GET", "x")
            await resp.read()


async def test_refused_connection_and_bad_urls():
    with pytest.raises(UpstreamError, match=r"connect to 127\.0\.0\.1:1"):
        await HttpPool("http://127.0.0.1:1").request("GET", "health", timeout_s=2)
    with pytest.raises(ValueError, match="backend URL"):
        HttpPool("127.0.0.1:8000")
