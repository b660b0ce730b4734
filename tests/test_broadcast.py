"""The broadcast option for weight versions, with gloo on loopback: the wire protocol between threads,
and the learner's Broadcaster driving two CPU policy servers through their dev-mode /collective_rpc —
afterwards they sample exactly as the version loaded from storage does."""

import shutil
import threading

import numpy as np
import pytest
import torch
from helpers import ServerThread
from test_remote_engine import greedy, publish

from eapo.core.config import BroadcastConfig, ExpertServerConfig
from eapo.core.net import free_port
from eapo.inference.cpu_server import create_app
from eapo.inference.model import load_model
from learner.broadcast import Broadcaster
from proto.broadcast import join, receive, send
from proto.weights import version_dir
from rollout_service.engine import TransformersEngine
from rollout_service.remote_engine import RemotePolicyEngine

POLICY = ExpertServerConfig(model="policy")


def test_a_version_reaches_every_rank_exactly():
    address = f"127.0.0.1:{free_port()}"
    tensors = {"w": torch.randn(3, 4), "ids": torch.arange(5), "half": torch.randn(7).to(torch.bfloat16)}
    got: dict[int, tuple] = {}

    def receiver(rank: int) -> None:
        got[rank] = receive(join(address, rank, 3, timeout_s=20))

    threads = [threading.Thread(target=receiver, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    send(join(address, 0, 3, timeout_s=20), 7, tensors)
    for t in threads:
        t.join(timeout=20)
    for version, received in got.values():
        assert version == 7 and list(received) == list(tensors)
        assert all(torch.equal(received[k], v) and received[k].dtype == v.dtype for k, v in tensors.items())
    assert set(got) == {1, 2}
    with pytest.raises(ValueError, match="host:port"):
        join("nowhere", 1, 2)


@pytest.fixture(scope="module")
def versions(world_dir, tmp_path_factory):
    """Version 0: the world's policy; version 1: the same architecture with other weights."""
    root = tmp_path_factory.mktemp("weights")
    publish(root, 0, world_dir / "policy")
    model, _ = load_model(world_dir / "policy")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed = tmp_path_factory.mktemp("changed")
    shutil.copytree(world_dir / "policy", changed, dirs_exist_ok=True)
    model.save_pretrained(changed)
    publish(root, 1, changed)
    return root


async def test_the_learner_broadcasts_a_version_that_servers_then_sample_exactly(versions, monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    apps = [create_app(POLICY, version_dir(versions, 0)) for _ in range(2)]
    with ServerThread(apps[0], free_port()) as a, ServerThread(apps[1], free_port()) as b:
        cfg = BroadcastConfig(servers=[a.url, b.url], address=f"127.0.0.1:{free_port()}", backend="gloo", timeout_s=30)
        broadcaster = Broadcaster(cfg)
        await broadcaster.start()
        assert broadcaster.group is not None and broadcaster.world_size == 3
        assert await broadcaster.send(1, version_dir(versions, 1))

        local = TransformersEngine(version_dir(versions, 1), version=1)
        for url in (a.url, b.url):
            remote = RemotePolicyEngine([url], "policy", version_dir(versions, 1), version=1)
            for problem in ("12+34*5", "7*8-9"):
                (got, _), (want, _) = (
                    await remote.sample(greedy(remote, problem)),
                    await local.sample(greedy(local, problem)),
                )
                assert got.token_ids == want.token_ids
                np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
            # The rollout still asks for the version it saw announced; a server holding it does nothing,
            # which it shows by not even reading the (here broken) shards.
            (version_dir(versions, 1) / "model.safetensors").rename(version_dir(versions, 1) / "moved")
            try:
                await remote.load_version(1, version_dir(versions, 1))
            finally:
                (version_dir(versions, 1) / "moved").rename(version_dir(versions, 1) / "model.safetensors")
            await remote.close()
        await local.close()


async def test_a_server_that_is_gone_turns_the_broadcast_off_and_the_run_goes_on(versions):
    dead = f"http://127.0.0.1:{free_port()}"
    broadcaster = Broadcaster(BroadcastConfig(servers=[dead], address=f"127.0.0.1:{free_port()}", backend="gloo",
                                              timeout_s=2))  # fmt: skip
    await broadcaster.start()
    assert broadcaster.group is None
    assert await broadcaster.send(1, version_dir(versions, 1)) is False


def test_collective_rpc_refuses_bad_calls_with_the_reason(versions, monkeypatch):
    import httpx

    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    with ServerThread(create_app(POLICY, version_dir(versions, 0)), free_port()) as server:
        url = f"{server.url}/collective_rpc"
        for body, reason in (
            ({"method": "eapo_receive_broadcast"}, "before eapo_join_broadcast"),
            ({"method": "eapo_load_weights"}, "bad arguments for eapo_load_weights"),
            ({"method": "rm_rf"}, "unsupported collective_rpc 'rm_rf'"),
        ):
            r = httpx.post(url, json=body)
            assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
        # and the server still serves the version it held
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.post(
            url, json={"method": "eapo_load_weights", "args": [str(version_dir(versions, 0))]}
        ).json() == {"results": [0]}
