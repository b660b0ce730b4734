"""Gateway resilience against protocol-true fake backends whose health and failures the test controls."""

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI, Response
from helpers import ServerThread

from eapo.config import ExpertBackend, GatewayConfig
from eapo.redis_server import free_port
from expert_gateway.app import create_app


def fake_backend(name: str, state: dict) -> FastAPI:
    """Speaks vLLM's subset: /health, /v1/chat/completions. ``state`` switches it: ok / 500 / unhealthy."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state["healthy"] else 503)

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        state["served"] += 1
        await asyncio.sleep(state.get("latency", 0.0))
        if state["fail"]:
            return Response(status_code=500, content=b'{"error": "boom"}', media_type="application/json")
        body = (
            '{"id": "x", "object": "chat.completion", "created": 0, "model": "expert", "choices": '
            f'[{{"index": 0, "message": {{"role": "assistant", "content": "{name}"}}, "finish_reason": "stop"}}]}}'
        )
        return Response(content=body, media_type="application/json")

    return app


def new_state() -> dict:
    return {"healthy": True, "fail": False, "served": 0}


def gateway_for(urls: list[str]) -> ServerThread:
    cfg = GatewayConfig(
        backends=[ExpertBackend(model="expert", url=u) for u in urls],
        health_interval_s=0.2,
        eject_after_failures=2,
        eject_s=0.6,
        request_timeout_s=10,
    )
    return ServerThread(create_app(cfg), free_port())


def ask(gw: str) -> httpx.Response:
    return httpx.post(
        f"{gw}/v1/chat/completions",
        json={"model": "expert", "messages": [{"role": "user", "content": "1"}]},
        timeout=10,
    )


def backends(gw: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(f"{gw}/admin/backends").json()}


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_failing_backend_is_ejected_without_client_errors_and_readmitted_after_recovery():
    good, bad = new_state(), new_state()
    bad["fail"] = True
    with (
        ServerThread(fake_backend("good", good), free_port()) as a,
        ServerThread(fake_backend("bad", bad), free_port()) as b,
        gateway_for([a.url, b.url]) as gw,
    ):
        answers = [ask(gw.url) for _ in range(20)]
        assert all(r.status_code == 200 for r in answers)  # every failure was retried on the good one
        assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {"good"}
        view = backends(gw.url)[b.url]
        assert view["state"] == "ejected" and view["ejections"] and "HTTP 500" in view["ejections"][0]["reason"]
        served_while_ejected = bad["served"]
        for _ in range(10):
            assert ask(gw.url).status_code == 200
        assert bad["served"] == served_while_ejected  # an ejected backend gets no traffic
        bad["fail"] = False  # recovers: back after the ejection runs out and a health check passes
        wait_until(lambda: backends(gw.url)[b.url]["state"] == "available")
        wait_until(lambda: (ask(gw.url), bad["served"] > served_while_ejected)[1])


def test_no_healthy_backend_answers_503_with_retry_after():
    s = new_state()
    with ServerThread(fake_backend("only", s), free_port()) as a, gateway_for([a.url]) as gw:
        assert ask(gw.url).status_code == 200
        s["healthy"] = False
        wait_until(lambda: backends(gw.url)[a.url]["state"] == "unhealthy")
        r = ask(gw.url)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "no healthy backend" in r.json()["error"]["message"]
        assert httpx.get(f"{gw.url}/readyz").status_code == 503
        s["healthy"] = True
        wait_until(lambda: ask(gw.url).status_code == 200)


@pytest.mark.asyncio
async def test_backend_killed_under_load_costs_no_client_request():
    one, two = new_state(), new_state()
    one["latency"] = two["latency"] = 0.02
    survivor = ServerThread(fake_backend("one", one), free_port()).__enter__()
    victim = ServerThread(fake_backend("two", two), free_port()).__enter__()
    try:
        with gateway_for([survivor.url, victim.url]) as gw:
            async with httpx.AsyncClient(timeout=20) as client:
                body = {"model": "expert", "messages": [{"role": "user", "content": "1"}]}

                async def call():
                    return await client.post(f"{gw.url}/v1/chat/completions", json=body)

                first = [asyncio.create_task(call()) for _ in range(150)]
                await asyncio.sleep(0.05)
                await asyncio.to_thread(victim.__exit__, None, None, None)  # killed mid-load
                rest = [asyncio.create_task(call()) for _ in range(150)]
                results = await asyncio.gather(*first, *rest)
            assert [r.status_code for r in results].count(200) == 300
            assert two["served"] > 0 and one["served"] >= 150  # both served before the kill
            assert backends(gw.url)[victim.url]["state"] in ("ejected", "unhealthy")
    finally:
        survivor.__exit__(None, None, None)
