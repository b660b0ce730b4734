"""A remote policy server on real vLLM (its CPU build): ``python -m vllm.entrypoints.openai.api_server``
with our worker extension in dev mode, driven by ``RemotePolicyEngine`` and the learner's
``Broadcaster`` — token-in/token-out over the completions API with the consult tag as a stop string, a
version loaded through ``/collective_rpc``, a version refused (vLLM answers 500) while the server keeps
the one it held, a version broadcast over gloo into vLLM's worker, and a server SIGKILLed and restarted.
One server for the module (~3 GB), restarted once."""

import asyncio

import httpx
import pytest
import pytest_asyncio
from bpe_model import build_model
from vllm_real import (
    Learner,
    VLLMServer,
    check_turns,
    publish_two_versions,
    require_vllm,
    turn_request,
    wait_until,
)

from eapo.core.config import BroadcastConfig
from eapo.core.net import free_port
from learner.broadcast import Broadcaster
from rollout_service.remote_engine import PolicyServerError, RemotePolicyEngine

require_vllm()
pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

PROBLEMS = ["2+3*4", "7*8-9", "12+3", "9-8"]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-server")
    v0, v1 = publish_two_versions(root / "weights", build_model(root / "model"), root / "moved")
    return [v0, v1], Learner(v0, v1), root


@pytest.fixture(scope="module")
def server(versions):
    (v0, _), _, root = versions
    server = VLLMServer(v0, free_port(), root / "server.log").start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(server, versions):
    engine = RemotePolicyEngine([server.url], "policy", versions[0][0], version=0)
    yield engine
    await engine.close()


async def sample_and_check(
    remote: RemotePolicyEngine, learner: Learner, version: int, seed: int = 0, weights: int | None = None
) -> int:
    requests = [turn_request(remote.tokenizer, p, seed=seed + i) for i, p in enumerate(PROBLEMS * 2)]
    results = await asyncio.gather(*(remote.sample(r) for r in requests))
    return check_turns(remote.tokenizer, learner, version, requests, results, weights)


async def test_turns_over_the_completions_api_are_token_in_token_out_and_end_at_the_tag(remote, versions):
    assert await sample_and_check(remote, versions[1], 0) >= len(PROBLEMS)  # the fine-tuned policy consults


async def test_a_version_loads_through_collective_rpc(remote, versions):
    (_, v1), learner, _ = versions
    await remote.load_version(1, v1)
    assert remote.version == 1
    await sample_and_check(remote, learner, 1, seed=10)


async def test_a_refused_version_leaves_the_server_on_the_one_it_held(remote, server, versions):
    """vLLM answers a failed collective_rpc with HTTP 500 (our CPU server with 400): a refusal either
    way, the engine keeps its version and the server goes on serving it."""
    with pytest.raises(PolicyServerError, match="HTTP 500"):
        await remote.load_version(7, versions[2] / "missing")
    assert remote.version == 1
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"{server.url}/collective_rpc", json={"method": "eapo_no_such_method", "args": []})
    assert r.status_code >= 400
    await sample_and_check(remote, versions[1], 1, seed=20)


async def test_the_learner_broadcasts_a_version_into_vllms_worker_over_gloo(remote, server, versions):
    (v0, _), learner, _ = versions
    cfg = BroadcastConfig(servers=[server.url], address=f"127.0.0.1:{free_port()}", backend="gloo", timeout_s=120)
    broadcaster = Broadcaster(cfg)
    await broadcaster.start()
    assert broadcaster.group is not None, "the group did not form (see the server log)"
    assert await broadcaster.send(0, v0)
    await sample_and_check(remote, learner, 1, seed=30, weights=0)  # the rollout has not caught up: it says 1
    await remote.load_version(0, v0)  # the rollout's weight check: the worker holds it already
    assert remote.version == 0
    await sample_and_check(remote, learner, 0, seed=30)


async def test_a_killed_server_is_an_error_then_restarted_it_takes_the_current_version(remote, server, versions):
    (_, v1), learner, _ = versions
    server.kill()
    with pytest.raises(Exception):  # noqa: B017 (connection refused: any client error will do)
        await remote.sample(turn_request(remote.tokenizer, PROBLEMS[0], seed=0))
    server.start()  # as Kubernetes restarts a pod: from the model it was started with (version 0)
    wait_until(server.ready, 60, "the restarted server's health")
    await remote.load_version(1, v1)  # what the rollout does at its next weight check
    await sample_and_check(remote, learner, 1, seed=40)
