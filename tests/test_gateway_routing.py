"""Gateway routing, admission, admin API and security, against fake vLLM pods in their own processes,
through the official openai client and plain HTTP."""

import asyncio
import collections
from contextlib import ExitStack

import httpx
import openai
import pytest
from helpers import FakeBackend, ServerThread

from eapo.core.config import DnsPool, ExpertBackend, GatewayConfig
from eapo.core.net import free_port
from expert_gateway import discovery
from expert_gateway.app import create_app

CHAT = {"model": "expert", "messages": [{"role": "user", "content": "1"}]}


def gateway(backends: list[FakeBackend], model: str = "expert", **settings) -> ServerThread:
    cfg = GatewayConfig(
        backends=[ExpertBackend(model=model, url=b.url) for b in backends], health_interval_s=0.2, **settings
    )
    return ServerThread(create_app(cfg), free_port())


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


async def concurrently(url: str, n: int, body: dict = CHAT, headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                                      for _ in range(n)))  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    with FakeBackend("a") as a, FakeBackend("b") as b:
        yield a, b


@pytest.fixture(autouse=True)
def reset(request):
    if "pair" in request.fixturenames:
        for b in request.getfixturevalue("pair"):
            b.control(latency_ms=0, fail=False, healthy=True)


def test_openai_client_streaming_and_not_routes_each_model_to_its_pool():
    with FakeBackend("a", model="math") as a, FakeBackend("b", model="code") as b:
        cfg = GatewayConfig(
            backends=[ExpertBackend(model="math", url=a.url), ExpertBackend(model="code", url=b.url)],
            aliases={"math-expert": "math"},
        )
        with ServerThread(create_app(cfg), free_port()) as gw:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
            for model, expected in (("math", "a"), ("code", "b"), ("math-expert", "a")):
                chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "q"}])
                assert chat.choices[0].message.content == expected
                text = client.completions.create(model=model, prompt="q")
                assert text.choices[0].text == expected
                chunks = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "q"}], stream=True
                )
                assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected + "!"
            assert {m.id for m in client.models.list()} == {"math", "code", "math-expert"}
            with pytest.raises(openai.NotFoundError, match="unknown model 'poetry'"):
                client.chat.completions.create(model="poetry", messages=[{"role": "user", "content": "q"}])


def test_least_outstanding_sends_less_to_the_slow_backend_and_round_robin_does_not(pair):
    fast, slow = pair
    slow.control(latency_ms=300)
    fast.control(latency_ms=20)

    async def workers(url: str) -> collections.Counter:  # 8 clients, each sending its next request on an answer
        counts: collections.Counter = collections.Counter()
        async with httpx.AsyncClient(timeout=30) as client:

            async def worker():
                for _ in range(8):
                    counts[answer(await client.post(f"{url}/v1/chat/completions", json=CHAT))] += 1

            await asyncio.gather(*(worker() for _ in range(8)))
        return counts

    for policy, check in (
        ("least_outstanding", lambda n: n["a"] > 3 * n["b"]),
        ("round_robin", lambda n: abs(n["a"] - n["b"]) <= 1),
    ):
        with gateway([fast, slow], policy=policy) as gw:
            counts = asyncio.run(workers(gw.url))
            assert check(counts), (policy, counts)


def test_weighted_policy_splits_by_weight(pair):
    a, b = pair
    cfg = GatewayConfig(
        backends=[ExpertBackend(model="expert", url=a.url, weight=3), ExpertBackend(model="expert", url=b.url)],
        policy="weighted",
    )
    with ServerThread(create_app(cfg), free_port()) as gw:
        counts = collections.Counter(answer(httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(40))
    assert counts == {"a": 30, "b": 10}


def test_power_of_two_choices_uses_the_whole_pool():
    with ExitStack() as stack:
        backends = [stack.enter_context(FakeBackend(n, latency_ms=20)) for n in "abc"]
        with gateway(backends, policy="power_of_two") as gw:
            counts = collections.Counter(answer(r) for r in asyncio.run(concurrently(gw.url, 60)))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) >= 10, counts


def test_sticky_episodes_keep_their_backend_until_it_is_overloaded(pair):
    with gateway(list(pair), sticky_episodes=True, sticky_max_imbalance=2) as gw:
        for episode in ("e1", "e2", "e3", "e4"):
            seen = {
                answer(httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"X-Episode-Id": episode}))
                for _ in range(5)
            }
            assert len(seen) == 1, (episode, seen)
        # 30 concurrent requests of one episode overload its backend: the rest spill to the other one.
        pair[0].control(latency_ms=200)
        pair[1].control(latency_ms=200)
        spread = collections.Counter(
            answer(r) for r in asyncio.run(concurrently(gw.url, 30, headers={"X-Episode-Id": "busy"}))
        )
        assert set(spread) == {"a", "b"}, spread


def test_full_queue_answers_429_and_queued_requests_are_served(pair):
    a, _ = pair
    a.control(latency_ms=2000)  # long enough for all eight to arrive while the first two are in flight
    with gateway([a], max_in_flight_per_backend=2, queue_size=3, queue_timeout_s=60) as gw:
        results = asyncio.run(concurrently(gw.url, 8))
        codes = collections.Counter(r.status_code for r in results)
        assert codes == {200: 5, 429: 3}, codes  # 2 in flight + 3 queued are served, the rest refused
        refused = next(r for r in results if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1 and "queued" in refused.json()["error"]["message"]
        pools = httpx.get(f"{gw.url}/admin/pools").json()
        assert pools[0]["rejected"] == 3 and pools[0]["queued"] == 0 and pools[0]["in_flight"] == 0
        assert 'eapo_gateway_requests_total{outcome="queue_full",route="chat"}' in httpx.get(f"{gw.url}/metrics").text


def test_queue_wait_past_its_deadline_answers_429(pair):
    a, _ = pair
    a.control(latency_ms=5000)  # the queued two time out long before the first answer, however busy the machine
    with gateway([a], max_in_flight_per_backend=1, queue_timeout_s=0.3) as gw:
        codes = collections.Counter(r.status_code for r in asyncio.run(concurrently(gw.url, 3)))
    assert codes == {200: 1, 429: 2}, codes


def test_admin_adds_drains_and_removes_backends(pair):
    a, b = pair
    with gateway([a]) as gw:
        assert {answer(httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(4)} == {"a"}
        added = httpx.post(f"{gw.url}/admin/backends", json={"model": "expert", "url": b.url, "weight": 2})
        assert added.status_code == 201 and added.json()["source"] == "admin"
        assert httpx.post(f"{gw.url}/admin/backends", json={"model": "expert", "url": b.url}).status_code == 409
        assert {answer(httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(8)} == {"a", "b"}

        a.control(latency_ms=3000)

        async def drain_during_requests():
            async with httpx.AsyncClient(timeout=30) as client:
                slow = [asyncio.create_task(client.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(6)]
                await wait_for_in_flight(client, gw.url, a.url)  # some are in flight on a
                drained = await client.post(f"{gw.url}/admin/backends/drain", params={"url": a.url})
                after = [await client.post(f"{gw.url}/v1/chat/completions", json=CHAT) for _ in range(4)]
                return drained, await asyncio.gather(*slow), after

        drained, during, after = asyncio.run(drain_during_requests())
        assert drained.json()[0]["state"] == "draining" and drained.json()[0]["in_flight"] > 0
        assert all(r.status_code == 200 for r in during)  # in-flight requests on the drained backend finished
        assert {answer(r) for r in after} == {"b"}  # new requests avoid it
        removed = httpx.delete(f"{gw.url}/admin/backends", params={"url": a.url})
        assert removed.status_code == 200 and removed.json()[0]["in_flight"] == 0
        assert [v["url"] for v in httpx.get(f"{gw.url}/admin/backends").json()] == [b.url]
        assert httpx.delete(f"{gw.url}/admin/backends", params={"url": a.url}).status_code == 404


def test_dns_discovery_adds_and_drains_backends_as_the_name_resolves(pair, monkeypatch):
    a, b = pair
    answers = {"expert.svc": {a.url}}

    async def fake_resolve(entry):  # stands in for the cluster DNS; the real lookup is tested below
        return set(answers[entry.host])

    monkeypatch.setattr(discovery, "resolve", fake_resolve)
    cfg = GatewayConfig(
        discovery=[DnsPool(model="expert", host="expert.svc", port=1)], discovery_interval_s=0.1, health_interval_s=0.2
    )

    def urls(gw):
        return {v["url"] for v in httpx.get(f"{gw.url}/admin/backends").json()}

    with ServerThread(create_app(cfg), free_port()) as gw:
        wait_until(lambda: urls(gw) == {a.url})
        answers["expert.svc"] = {a.url, b.url}  # a pod joined
        wait_until(lambda: urls(gw) == {a.url, b.url})
        answers["expert.svc"] = {b.url}  # a pod went away
        wait_until(lambda: urls(gw) == {b.url})
        assert {answer(httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)) for _ in range(4)} == {"b"}


async def test_discovery_resolves_a_real_name():
    urls = await discovery.resolve(DnsPool(model="expert", host="localhost", port=8123))
    assert "http://127.0.0.1:8123" in urls


def test_tokens_guard_data_plane_and_admin_separately(pair):
    a, _ = pair
    with gateway([a], api_token="data-secret", admin_token="admin-secret") as gw:
        url = f"{gw.url}/v1/chat/completions"
        assert httpx.post(url, json=CHAT).status_code == 401
        assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
        for refused in (httpx.post(url, json=CHAT), httpx.get(f"{gw.url}/v1/models")):  # ASGI fast path, FastAPI
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            assert refused.json()["error"]["message"] == "missing or wrong bearer token for the data plane API"
        assert answer(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer data-secret"})) == "a"
        assert httpx.get(f"{gw.url}/admin/backends", headers={"Authorization": "Bearer data-secret"}).status_code == 401
        assert (
            httpx.get(f"{gw.url}/admin/backends", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
        )
        assert httpx.get(f"{gw.url}/healthz").status_code == 200  # probes stay open
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="data-secret", max_retries=0)
        assert client.chat.completions.create(model="expert", messages=[{"role": "user", "content": "q"}])
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'reason="unauthorized_data plane"' in metrics and "data-secret" not in metrics


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "JSON object"),
        (b'{"messages": []}', 400, "string 'model'"),
        (b'{"model": "expert", "max_tokens": 100000}', 422, "max_tokens=100000 exceeds"),
        (b'{"model": "expert", "pad": "' + b"x" * 5000 + b'"}', 413, "exceeds the limit of 4096 bytes"),
    ],
)
def test_bad_requests_get_clear_errors(pair, body, status, message):
    with gateway([pair[0]], max_body_bytes=4096, max_tokens_limit=1024) as gw:
        r = httpx.post(f"{gw.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
        consult = httpx.post(f"{gw.url}/v1/consult", json={"model": "expert", "queries": ["q"], "max_tokens": 2000})
        assert consult.status_code == 422 and "max_tokens=2000" in consult.json()["error"]["message"]
        schema = httpx.post(f"{gw.url}/v1/consult", json={"model": "expert", "queries": []})
        assert schema.status_code == 422 and "queries" in schema.json()["error"]["message"]


async def wait_for_in_flight(client: httpx.AsyncClient, gw: str, url: str, timeout_s: float = 60.0) -> None:
    """Until the gateway has a request in flight on backend ``url``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not any(v["url"] == url and v["in_flight"] for v in (await client.get(f"{gw}/admin/backends")).json()):
        assert asyncio.get_running_loop().time() < deadline, f"no request in flight on {url}"
        await asyncio.sleep(0.02)


def wait_until(predicate, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
