"""Gateway resilience against fake vLLM pods in their own processes, whose health, latency and failures
the test controls, and which it SIGKILLs."""

import asyncio
import contextlib
import time

import aiohttp
import httpx
from helpers import FakeBackend, ServerThread

from eapo.core.config import ExpertBackend, GatewayConfig
from eapo.core.net import free_port
from expert_gateway.app import create_app

CHAT = {"model": "expert", "messages": [{"role": "user", "content": "1"}]}


def gateway_for(urls: list[str], **settings) -> ServerThread:
    settings = {"health_interval_s": 0.2, "eject_after_failures": 2, "eject_s": 0.6, "request_timeout_s": 10} | settings
    cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=u) for u in urls], **settings)
    return ServerThread(create_app(cfg), free_port())


def ask(gw: str) -> httpx.Response:
    return httpx.post(f"{gw}/v1/chat/completions", json=CHAT, timeout=10)


def backends(gw: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(f"{gw}/admin/backends").json()}


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def expire_ejections(gw: ServerThread) -> None:
    """End every ejection now: the test stands in for the clock rather than racing a short ``eject_s``
    (ten sequential requests outlast 0.6 s on a busy machine, and the backend came back mid-check)."""
    for backend in gw.server.config.app.state.gateway.pools.backends():
        backend.ejected_until = 0.0


def test_failing_backend_is_ejected_without_client_errors_and_readmitted_after_recovery():
    with (
        FakeBackend("good") as good,
        FakeBackend("bad") as bad,
        gateway_for([good.url, bad.url], eject_s=3600) as gw,
    ):
        bad.control(fail=True)
        answers = [ask(gw.url) for _ in range(20)]
        assert all(r.status_code == 200 for r in answers)  # every failure was retried on the good one
        assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {"good"}
        view = backends(gw.url)[bad.url]
        assert view["state"] == "ejected" and view["ejections"] and "HTTP 500" in view["ejections"][0]["reason"]
        failed_while_ejected = bad.counters()["failed"]
        for _ in range(10):
            assert ask(gw.url).status_code == 200
        assert bad.counters()["failed"] == failed_while_ejected  # an ejected backend gets no traffic
        bad.control(fail=False)  # recovers: back after the ejection runs out and a health check passes
        assert backends(gw.url)[bad.url]["state"] == "ejected"  # a passing health check alone is not enough
        expire_ejections(gw)
        wait_until(lambda: backends(gw.url)[bad.url]["state"] == "available")
        wait_until(lambda: (ask(gw.url), bad.counters()["served"] > 0)[1])


def test_health_checks_between_failed_requests_do_not_keep_a_failing_backend_in():
    """A backend that answers ``/health`` but fails every request is ejected however slowly its requests
    come: a passing health check between two failures does not restart the count of failures in a row
    (only a served request does). The test waits for health checks between the requests, as a busy
    machine or a low request rate would space them."""
    with (
        FakeBackend("good") as good,
        FakeBackend("bad") as bad,
        gateway_for([good.url, bad.url], eject_s=3600, health_interval_s=0.05) as gw,
    ):
        bad.control(fail=True)
        for _ in range(40):  # round robin over two: bad gets every other request
            if bad.counters()["failed"] >= 2:
                break
            checks = bad.counters()["checks"]
            assert ask(gw.url).status_code == 200  # retried on the good one
            wait_until(lambda c=checks: bad.counters()["checks"] >= c + 2)
        assert bad.counters()["failed"] == 2 and good.counters()["served"] >= 2
        assert backends(gw.url)[bad.url]["state"] == "ejected"


def test_a_lone_backend_gets_another_try_and_is_never_ejected_by_failed_requests():
    with FakeBackend("only") as only, gateway_for([only.url], max_attempts=3) as gw:
        only.control(fail_next=1)  # one transient failure: retried on the same backend
        assert ask(gw.url).status_code == 200 and only.counters()["failed"] == 1
        only.control(fail_next=3)
        r = ask(gw.url)  # three attempts, all failed
        assert r.status_code == 503 and "all backends failed" in r.json()["error"]["message"]
        assert only.counters()["failed"] == 4 and r.headers["Retry-After"]
        # Ejecting the pool's last available backend would turn every request into a 503: it stays in.
        assert backends(gw.url)[only.url]["state"] == "available" and not backends(gw.url)[only.url]["ejections"]
        assert ask(gw.url).status_code == 200


def test_no_healthy_backend_answers_503_with_retry_after():
    with FakeBackend("only") as only, gateway_for([only.url]) as gw:
        assert ask(gw.url).status_code == 200
        only.control(healthy=False)
        wait_until(lambda: backends(gw.url)[only.url]["state"] == "unhealthy")
        r = ask(gw.url)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "no healthy backend" in r.json()["error"]["message"]
        assert httpx.get(f"{gw.url}/readyz").status_code == 503
        only.control(healthy=True)
        wait_until(lambda: ask(gw.url).status_code == 200)


async def test_backend_sigkilled_under_load_costs_no_client_request():
    """600 requests, 200 at a time; one of the two backends is SIGKILLed while requests are in flight on it.
    (aiohttp as the client: httpx's pool spends quadratic time on 600 queued requests, which throttles
    the load to a few dozen requests a second.)"""
    with (
        FakeBackend("survivor", latency_ms=50) as survivor,
        FakeBackend("victim", latency_ms=50) as victim,
        gateway_for([survivor.url, victim.url]) as gw,
    ):
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200), timeout=timeout) as client:

            async def call() -> tuple[int, str]:
                async with client.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
                    return resp.status, await resp.text()

            calls = [asyncio.create_task(call()) for _ in range(600)]
            await asyncio.to_thread(wait_until, lambda: backends(gw.url)[victim.url]["in_flight"] > 5)
            victim.kill()  # with requests in flight on it
            results = await asyncio.gather(*calls)
        codes = [status for status, _ in results]
        errors = {text for status, text in results if status != 200}
        assert codes.count(200) == 600, ({c: codes.count(c) for c in set(codes)}, errors)
        assert backends(gw.url)[victim.url]["state"] in ("ejected", "unhealthy")
        assert backends(gw.url)[victim.url]["in_flight"] == 0


async def test_client_disconnect_cancels_the_upstream_request():
    with FakeBackend("slow", latency_ms=120_000) as slow, gateway_for([slow.url]) as gw:

        async def hang_up(path: str, body: dict, upstream: int) -> None:
            """Send, wait until the gateway has the request in flight upstream, then go away."""
            async with httpx.AsyncClient(timeout=300) as client:
                call = asyncio.create_task(client.post(f"{gw.url}{path}", json=body))
                in_flight = lambda: backends(gw.url)[slow.url]["in_flight"]  # noqa: E731
                await asyncio.to_thread(wait_until, lambda: in_flight() == upstream)
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
            await asyncio.to_thread(wait_until, lambda: in_flight() == 0)

        for body in (CHAT, CHAT | {"stream": True}):
            await hang_up("/v1/chat/completions", body, 1)
        await hang_up("/v1/consult", {"model": "expert", "queries": ["a", "b"]}, 2)
        await asyncio.to_thread(wait_until, lambda: slow.counters()["cancelled"] == 4)
        assert slow.counters()["served"] == 0
