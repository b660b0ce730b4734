"""The expert gateway in front of two real vLLM expert servers (vLLM's CPU build), each started as
``eapo up`` starts one (``eapo expert-server`` with ``expert_server.engine: vllm``) on the tiny world's
solver: OpenAI chat completions through the official client, checked token by token against our own
forward (so vLLM reads the world's chat template and tokenizer as we do), SSE streaming, ``/v1/consult``
batches; then one server SIGKILLed while consult batches are in flight on it, and not one query fails
(the gateway retries on the survivor)."""

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest
import torch
from helpers import ServerThread
from vllm_real import LOGPROB_TOL, VLLMServer, require_vllm, wait_until

from eapo.core.config import ExpertBackend, GatewayConfig
from eapo.core.net import free_port
from eapo.inference.model import load_model
from expert_gateway.app import create_app
from learner.loss import token_logprobs
from proto import ConsultRequest, ConsultResponse

require_vllm()
pytestmark = pytest.mark.vllm


class ExpertServer(VLLMServer):
    """``eapo expert-server`` with the vLLM engine: the CLI becomes vLLM's OpenAI server (``execve``)."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        settings = {"ENGINE": "vllm", "MODEL": self.name, "MODEL_PATH": str(self.model), "PORT": str(self.port),
                    "VLLM_ARGS": json.dumps(["--dtype", "float32", "--enforce-eager", "--seed", "0"])}  # fmt: skip
        env = os.environ | {f"EAPO_EXPERT_SERVER__{key}": value for key, value in settings.items()}
        return [sys.executable, "-m", "eapo.cli", "expert-server"], env


@pytest.fixture(scope="module")
def pool(tmp_path_factory, world_dir: Path):
    """Two vLLM servers serving the world's solver as 'expert', started side by side, and a gateway."""
    root = tmp_path_factory.mktemp("vllm-gateway")
    model = world_dir / "expert"
    servers = [ExpertServer(model, free_port(), root / f"{name}.log", name="expert") for name in ("survivor", "victim")]
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


async def test_chat_completions_sse_and_consult_batches_pass_through_to_vllm(pool, world_dir: Path):
    gateway, _ = pool
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", timeout=120)
    messages = [{"role": "user", "content": "2 + 3 * 4"}]
    chat = await client.chat.completions.create(
        model="expert", messages=messages, max_tokens=12, temperature=0, logprobs=True
    )
    text, sampled = chat.choices[0].message.content, chat.choices[0].logprobs.content
    assert text and chat.usage.completion_tokens > 0
    # Character-level tokens: the text maps back to exactly the ids vLLM sampled, and their log-probs
    # under our forward of the prompt as we render it are vLLM's (a lost space would shift them all).
    model, tok = load_model(world_dir / "expert")
    prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(sampled) >= len(ids)
    x = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        want = token_logprobs(model(input_ids=x).logits, x)[0, len(prompt_ids) :].tolist()
    assert [t.logprob for t in sampled[: len(ids)]] == pytest.approx(want, abs=LOGPROB_TOL)
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
