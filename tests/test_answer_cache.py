"""Greedy answers computed once. The gateway's cache: one upstream call per (model, query, max_tokens),
concurrent asks sharing it, errors and sampled answers never kept, bounded (real gateway, fake vLLM pod on
loopback). The CPU expert server's: its own completions, equal to what it decodes, dropped with its weights."""

import asyncio

import httpx
import pytest
from helpers import FakeBackend, ServerThread
from test_remote_engine import publish

from eapo.core.answer_cache import AnswerCache
from eapo.core.config import ExpertBackend, ExpertServerConfig, GatewayConfig
from eapo.core.net import free_port
from eapo.inference.cpu_server import create_app as create_server
from expert_gateway.app import create_app
from proto.weights import version_dir


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


@pytest.mark.asyncio
async def test_a_call_begun_before_clear_is_answered_but_not_kept():
    cache, release = AnswerCache(4), asyncio.Event()

    async def old_weights() -> str:
        await release.wait()
        return "old"

    before = asyncio.create_task(cache.answer("q", old_weights))
    await asyncio.sleep(0)
    cache.clear()  # new weights
    after = asyncio.create_task(cache.answer("q", lambda: asyncio.sleep(0, result="new")))  # not joined to before
    release.set()
    assert (await before, await after) == ("old", "new")
    assert dict(cache.answers) == {"q": "new"} and not cache.calls
    assert cache.outcomes == {"hit": 0, "shared": 0, "miss": 2}
    assert await cache.answer("null", lambda: asyncio.sleep(0, result=None)) is None  # vLLM's null content
    assert "null" not in cache.answers


@pytest.mark.asyncio
async def test_the_log_line_comes_once_every_log_every_lookups_however_they_interleave(caplog):
    cache, release = AnswerCache(4, log_every=3), asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "a"

    with caplog.at_level("INFO", logger="eapo.core.answer_cache"):
        lookups = [asyncio.create_task(cache.answer(k, slow)) for k in "xxyxyyz"]  # 7 lookups, 3 calls in flight
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*lookups)
        await cache.answer("x", slow)  # the 8th and 9th: hits
        await cache.answer("z", slow)
    assert [r.getMessage() for r in caplog.records] == [
        "answer cache: 0 kept; lookups {'hit': 0, 'shared': 1, 'miss': 2}",
        "answer cache: 0 kept; lookups {'hit': 0, 'shared': 4, 'miss': 2}",
        "answer cache: 3 kept; lookups {'hit': 2, 'shared': 4, 'miss': 3}",
    ]


def chat(url: str, content: str, temperature: float = 0.0) -> str:
    body = {"model": "expert", "messages": [{"role": "user", "content": content}], "max_tokens": 12}
    resp = httpx.post(f"{url}/v1/chat/completions", json=body | {"temperature": temperature}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def test_the_cpu_server_keeps_its_own_greedy_completions(world_dir, tmp_path, monkeypatch):
    """On by default; what it answers is what a server without it decodes; new weights drop every answer."""
    assert ExpertServerConfig().answer_cache > 0
    publish(tmp_path, 0, world_dir / "expert")
    publish(tmp_path, 1, world_dir / "expert")  # a new version (same bytes): loading it must still clear
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    app = create_server(ExpertServerConfig(seed=3), version_dir(tmp_path, 0))
    without = create_server(ExpertServerConfig(seed=3, answer_cache=0), world_dir / "expert")
    with ServerThread(app, free_port()) as server, ServerThread(without, free_port()) as plain:
        answers = app.state.served.answers
        first = chat(server.url, "3+4*2")
        assert chat(server.url, "3+4*2") == first == chat(plain.url, "3+4*2")
        assert without.state.served.answers is None
        assert answers.outcomes == {"hit": 1, "shared": 0, "miss": 1}
        chat(server.url, "3+4*2", temperature=0.9)  # sampled: decoded, never looked up
        assert answers.outcomes == {"hit": 1, "shared": 0, "miss": 1}

        async def together() -> list[str]:  # one decode for all three, however they interleave
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "expert", "messages": [{"role": "user", "content": "9*9-1"}], "temperature": 0}
                replies = await asyncio.gather(
                    *(client.post(f"{server.url}/v1/chat/completions", json=body) for _ in range(3))
                )
            return [r.json()["choices"][0]["message"]["content"] for r in replies]

        assert len(set(asyncio.run(together()))) == 1
        assert answers.outcomes["miss"] == 2 and answers.outcomes["hit"] + answers.outcomes["shared"] == 3

        load = {"method": "eapo_load_weights", "args": [str(version_dir(tmp_path, 1))]}
        assert httpx.post(f"{server.url}/collective_rpc", json=load, timeout=60).json() == {"results": [1]}
        assert not answers.answers
        assert chat(server.url, "3+4*2") == first
        assert answers.outcomes["miss"] == 3
