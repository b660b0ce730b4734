"""A protocol-true stand-in for a vLLM pod, for tests and benchmarks where no GPU serves the experts.

It speaks the subset of vLLM's OpenAI server the gateway uses (``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions`` and ``/v1/completions``, both also as SSE streams) with a latency and
failure behaviour the caller controls — at start (``--latency-ms``), or live through
``POST /control`` (``{"latency_ms": …, "fail": true, "fail_next": 2, "healthy": false}``); ``GET /control`` returns
the counters (served, failed, cancelled: requests whose client went away before the answer; checks: health checks).
aiohttp, not FastAPI: in benchmarks it must never be the bottleneck.

    python -m tests.fake_backend --port 9001 --name a --model expert --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def make_app(name: str, model: str, latency_ms: float = 0.0) -> web.Application:
    state = {"latency_ms": latency_ms, "fail": False, "fail_next": 0, "healthy": True, "served": 0, "failed": 0,
             "cancelled": 0, "checks": 0}  # fmt: skip

    async def health(request: web.Request) -> web.Response:
        state["checks"] += 1
        return web.Response(status=200 if state["healthy"] else 503)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model", "owned_by": name}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") != model:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}, status=404
            )
        try:
            await asyncio.sleep(state["latency_ms"] / 1000)
        except asyncio.CancelledError:
            state["cancelled"] += 1
            raise
        if state["fail"] or state["fail_next"] > 0:
            state["fail_next"] = max(state["fail_next"] - 1, 0)
            state["failed"] += 1
            return web.json_response({"error": {"message": "injected failure", "code": 500}}, status=500)
        state["served"] += 1
        chat = request.path.endswith("/chat/completions")
        if body.get("stream"):
            return await stream(request, chat)
        choice = {"index": 0, "finish_reason": "stop"}
        choice |= {"message": {"role": "assistant", "content": name}} if chat else {"text": name}
        kind = "chat.completion" if chat else "text_completion"
        return web.json_response(
            {
                "id": "fake",
                "object": kind,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def stream(request: web.Request, chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in (name, "!"):
            delta = {"index": 0, "finish_reason": None}
            delta |= {"delta": {"role": "assistant", "content": piece}} if chat else {"text": piece}
            kind = "chat.completion.chunk" if chat else "text_completion"
            chunk = {"id": "fake", "object": kind, "created": int(time.time()), "model": model, "choices": [delta]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            state.update(
                {k: v for k, v in (await request.json()).items() if k in ("latency_ms", "fail", "fail_next", "healthy")}
            )
        return web.json_response(state)

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/v1/models", models),
            web.post("/v1/chat/completions", complete),
            web.post("/v1/completions", complete),
            web.get("/control", control),
            web.post("/control", control),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--model", default="expert")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(args.name, args.model, args.latency_ms),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,  # a client that goes away cancels the "generation", as in vLLM
    )


if __name__ == "__main__":
    main()
