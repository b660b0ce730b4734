"""The gateway's greedy answer cache: one upstream call per (model, query, max_tokens), concurrent asks
sharing it, errors and sampled answers never kept, bounded (real gateway, fake vLLM pod on loopback)."""

import asyncio

import httpx
import pytest
from helpers import FakeBackend, ServerThread

from eapo.core.config import ExpertBackend, GatewayConfig
from eapo.core.net import free_port
from expert_gateway.answer_cache import AnswerCache
from expert_gateway.app import create_app


def consult(url: str, queries: list[str], temperature: float = 0.0) -> list[dict]:
    body = {"model": "expert", "queries": queries, "max_tokens": 8, "temperature": temperature}
    resp = httpx.post(f"{url}/v1/consult", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def test_greedy_answers_are_computed_once_and_errors_and_samples_never_kept():
    with FakeBackend("pod", latency_ms=300) as pod:  # slow enough that the batch's twins overlap
        cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=pod.url)], answer_cache=2, max_attempts=1)
        with ServerThread(create_app(cfg), free_port()) as gw:
            first = consult(gw.url, ["1+1", "1+1", "2+2"])  # the twin joins the call in flight
            assert [r["answer"] for r in first] == ["pod"] * 3 and pod.counters()["served"] == 2
            consult(gw.url, ["1+1"])  # kept
            assert pod.counters()["served"] == 2
            consult(gw.url, ["1+1"], temperature=0.7)  # sampled: always asked
            assert pod.counters()["served"] == 3

            pod.control(fail=True)
            assert consult(gw.url, ["3+3"])[0]["error"]
            pod.control(fail=False)
            assert consult(gw.url, ["3+3"])[0]["answer"] == "pod"  # the error was not kept
            assert pod.counters()["served"] == 4

            consult(gw.url, ["2+2"])  # bounded at 2: "2+2" was least recently used, and went for "3+3"
            assert pod.counters()["served"] == 5
            view = httpx.get(f"{gw.url}/admin/answer-cache", timeout=10).json()
    assert view == {"size": 2, "entries": 2, "in_flight": 0, "hit": 1, "shared": 1, "miss": 5}


@pytest.mark.asyncio
async def test_a_requester_that_leaves_does_not_cancel_the_call_the_others_wait_on():
    cache, release, calls = AnswerCache(4), asyncio.Event(), []

    async def compute() -> str:
        calls.append(1)
        await release.wait()
        return "42"

    leaver = asyncio.create_task(cache.answer(("expert", "6*7", 8), compute))
    stayer = asyncio.create_task(cache.answer(("expert", "6*7", 8), compute))
    await asyncio.sleep(0)
    leaver.cancel()
    release.set()
    assert await stayer == "42" and calls == [1]
    assert leaver.cancelled() and cache.answers == {("expert", "6*7", 8): "42"}
