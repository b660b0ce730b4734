"""The remote policy engine against the CPU OpenAI-compatible server in vLLM's dev mode: token-in,
token-out sampling equals the in-process engine, episodes run on it, and published weight versions
are loaded into the server through ``/collective_rpc``."""

import shutil

import numpy as np
import pytest
from helpers import ServerThread

from eapo.core.config import ExpertServerConfig, RolloutConfig, load_config
from eapo.core.net import free_port
from eapo.inference.cpu_server import create_app
from eapo.inference.sampling import SampleRequest
from proto import AnnealState, PromptTask
from proto import episode_format as fmt
from proto.weights import version_dir, write_version
from rollout_service.engine import TransformersEngine, open_engine
from rollout_service.episode import run_episode
from rollout_service.remote_engine import PolicyServerError, RemotePolicyEngine


def publish(root, version: int, source) -> None:
    write_version(root, version, version, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


@pytest.fixture(scope="module")
def weights(world_dir, tmp_path_factory):
    """Version 0: the world's policy; version 1: different weights (the expert, same tokenizer)."""
    root = tmp_path_factory.mktemp("weights")
    publish(root, 0, world_dir / "policy")
    publish(root, 1, world_dir / "expert")
    return root


@pytest.fixture(scope="module")
def policy_server(weights):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_SERVER_DEV_MODE", "1")
    app = create_app(ExpertServerConfig(model="policy"), version_dir(weights, 0))
    mp.undo()
    with ServerThread(app, free_port()) as server:
        yield server.url


def greedy(engine, prompt: str, tokens: int = 24) -> SampleRequest:
    ids = engine.tokenizer.encode(fmt.eval_prompt(prompt))
    eos = engine.tokenizer.eos_token_id
    return SampleRequest(prompt_ids=ids, max_new_tokens=tokens, stop_ids=frozenset({eos}), temperature=0.0)


async def test_token_in_token_out_matches_the_in_process_engine_and_follows_new_versions(policy_server, weights):
    remote = RemotePolicyEngine([policy_server], "policy", version_dir(weights, 0), version=0)
    for version in (0, 1):
        if version:
            await remote.load_version(1, version_dir(weights, 1))
        local = TransformersEngine(version_dir(weights, version), version=version)
        for problem in ("12+34*5", "7*8-9"):
            (got, got_version), (want, _) = (
                await remote.sample(greedy(remote, problem)),
                await local.sample(greedy(local, problem)),
            )
            assert got.token_ids == want.token_ids and got.finish == want.finish
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
            assert got_version == version
        await local.close()
    await remote.close()


async def test_a_version_that_does_not_verify_is_refused_and_the_engine_keeps_its_version(
    policy_server, weights, tmp_path
):
    remote = RemotePolicyEngine([policy_server], "policy", version_dir(weights, 0), version=0)
    with pytest.raises(PolicyServerError, match="cannot load weights"):
        await remote.load_version(7, tmp_path / "missing")
    assert remote.version == 0
    await remote.close()


async def test_episodes_run_on_policy_servers(policy_server, weights, gateway, tiny_world):
    cfg = load_config(
        None,
        world=tiny_world.model_dump(mode="json"),
        rollout={"engine": "remote", "policy_urls": [policy_server, policy_server], "gateway_url": gateway},
    )
    engine = await open_engine(cfg, version_dir(weights, 0), 0)
    assert isinstance(engine, RemotePolicyEngine) and engine.version == 0
    task = PromptTask(prompt_id="p", problem="2+3*4", answer="14")
    anneal = AnnealState(step=0, acceptance=1.0, budget=3, penalty=0.0)
    traj = await run_episode(engine, None, task, anneal, RolloutConfig(max_new_tokens=24), 0)
    await engine.close()
    tok = engine.tokenizer
    assert traj.turns and traj.turns[0].policy_version == 0
    assert len(traj.behaviour_logprobs) == len(traj.token_ids) and traj.loss_mask[traj.prompt_len :].all()
    assert tok.decode(traj.token_ids[: traj.prompt_len].tolist()) == fmt.eval_prompt(task.problem)
