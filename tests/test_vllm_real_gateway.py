"""The expert gateway in front of two real vLLM expert servers (vLLM's CPU build): OpenAI chat completions
through the official client, SSE streaming, ``/v1/consult`` batches; then one server SIGKILLed while
consult batches are in flight on it, and not one query fails (the gateway retries on the survivor).
The expert is the BPE model of ``tests/bpe_model`` (attention heads of 32, a chat template): what it
answers does not matter here, that every query gets an answer does."""

import asyncio

import aiohttp
import httpx
import openai
import pytest
from bpe_model import build_model
from helpers import ServerThread
from vllm_real import VLLMServer, require_vllm, wait_until

from eapo.core.config import ExpertBackend, GatewayConfig
from eapo.core.net import free_port
from expert_gateway.app import create_app
from proto import ConsultRequest, ConsultResponse

require_vllm()
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two vLLM servers serving 'expert', started side by side, and a gateway."""
    root = tmp_path_factory.mktemp("vllm-gateway")
    model = build_model(root / "expert")
    servers = [VLLMServer(model, free_port(), root / f"{name}.log", name="expert") for name in ("survivor", "victim")]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait()
        settings = {"health_interval_s": 0.5, "eject_after_failures": 2, "eject_s": 5, "request_timeout_s": 120}
        cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=s.url) for s in servers], **settings)
        with ServerThread(create_app(cfg), free_port()) as gateway:
            yield gateway.url, servers
    finally:
        for server in servers:
            server.stop()


def backends(gateway: str) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(f"{gateway}/admin/backends", timeout=30).json()}


def consult(queries: list[str]) -> dict:
    return ConsultRequest(model="expert", queries=queries, max_tokens=16, deadline_s=120).model_dump(mode="json")


async def test_chat_completions_sse_and_consult_batches_pass_through_to_vllm(pool):
    gateway, _ = pool
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", timeout=120)
    messages = [{"role": "user", "content": "2+3*4"}]
    chat = await client.chat.completions.create(model="expert", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
    stream = await client.chat.completions.create(model="expert", messages=messages, max_tokens=8, stream=True)
    chunks = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert chunks
    await client.close()
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{gateway}/v1/consult", json=consult(["2+3", "7*8", "9-1"]))
    assert r.status_code == 200, r.text
    results = ConsultResponse.model_validate(r.json()).results
    assert [x.index for x in results] == [0, 1, 2] and all(x.answer and x.error is None for x in results)


async def test_an_expert_server_sigkilled_under_load_costs_no_consult(pool):
    """16 clients send consult batches of 3 queries back to back; the victim is SIGKILLed (its engine and
    worker too) while queries are in flight on it, and every client sends two more batches after that."""
    gateway, (_, victim) = pool
    killed = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def client(c: int) -> list:
            results, after_kill, i = [], 0, 0
            while after_kill < 2:
                queries = [f"{c}+{i}", f"{c}*{i}", f"{c}-{i}"]
                async with session.post(f"{gateway}/v1/consult", json=consult(queries)) as r:
                    assert r.status == 200, await r.text()
                    results += ConsultResponse.model_validate(await r.json()).results
                after_kill, i = after_kill + killed.is_set(), i + 1
            return results

        def loaded() -> bool:
            return backends(gateway)[victim.url]["in_flight"] > 2

        clients = [asyncio.create_task(client(c)) for c in range(16)]
        try:
            await asyncio.to_thread(wait_until, loaded, 300, "queries in flight on the victim", 0.05)
        except BaseException:
            for task in clients:
                task.cancel()
            raise
        await asyncio.to_thread(victim.kill)
        killed.set()
        results = [x for done in await asyncio.gather(*clients) for x in done]
    failed = [x.error for x in results if x.error is not None]
    assert len(results) >= 16 * 2 * 3 and not failed, failed[:5]
    assert backends(gateway)[victim.url]["state"] in ("ejected", "unhealthy")
