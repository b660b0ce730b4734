"""The in-process policy engine (``rollout.engine: vllm``, ``rollout_service.vllm_engine``) on real vLLM
(its CPU build), one engine for the module, on a BPE policy fine-tuned to consult (``tests/bpe_model``):
token-id prompts in, sampled ids and behaviour log-probs out that equal the learner's own forward; a
consult turn ends at the closing tag as a stop string; a version loaded mid-episode through the worker
extension changes the weights exactly from the next turn on, and each turn records the version that
sampled it."""

import asyncio

import pytest
import pytest_asyncio
from bpe_model import build_model
from test_own_model import ArithmeticExperts
from vllm_real import (
    ENGINE_ARGS,
    LOGPROB_TOL,
    Learner,
    check_turns,
    publish_two_versions,
    require_vllm,
    turn_request,
)

from eapo.core.config import RolloutConfig
from eapo.inference.vllm_server import server_env
from proto import AnnealState, PromptTask
from rollout_service.engine import TransformersEngine
from rollout_service.episode import run_episode

require_vllm()
pytestmark = pytest.mark.vllm

PROBLEMS = ["2+3*4", "7*8-9", "12+3", "9-8"]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-engine")
    v0, v1 = publish_two_versions(root / "weights", build_model(root / "model"), root / "moved")
    return [v0, v1], Learner(v0, v1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(versions):
    from rollout_service.vllm_engine import VLLMEngine

    mp = pytest.MonkeyPatch()
    for key, value in server_env({}).items():
        mp.setenv(key, value)
    engine = VLLMEngine(versions[0][0], 0, ENGINE_ARGS)
    yield engine
    await engine.close()
    await engine.close()  # closing again does nothing
    mp.undo()


@pytest.mark.asyncio(loop_scope="module")
async def test_turns_are_token_in_token_out_with_the_learners_log_probs_and_end_at_the_tag(engine, versions):
    """Concurrent turns at temperature 1 (DAPO's), checked by ``vllm_real.check_turns``."""
    requests = [turn_request(engine.tokenizer, p, seed=i) for i, p in enumerate(PROBLEMS * 2)]
    results = await asyncio.gather(*(engine.sample(r) for r in requests))
    assert check_turns(engine.tokenizer, versions[1], 0, requests, results) >= len(requests) // 2  # it consults


@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_turns_equal_the_cpu_engines(engine, versions):
    cpu = TransformersEngine(versions[0][0], version=0)
    try:
        for problem in PROBLEMS:
            (got, _), (want, _) = await asyncio.gather(
                engine.sample(turn_request(engine.tokenizer, problem, 0, temperature=0.0)),
                cpu.sample(turn_request(cpu.tokenizer, problem, 0, temperature=0.0)),
            )
            assert (got.token_ids, got.finish, got.stop_string) == (want.token_ids, want.finish, want.stop_string)
    finally:
        await cpu.close()


class LoadsAfterTheFirstTurn:
    """The engine, loading ``path`` as version 1 right after the first turn it samples: episodes in
    flight go on across the load, as they do when the learner publishes mid-episode."""

    def __init__(self, engine, path):
        self.engine, self.path, self.tokenizer, self.loaded = engine, path, engine.tokenizer, False

    @property
    def version(self) -> int:
        return self.engine.version

    async def sample(self, request):
        result = await self.engine.sample(request)
        if not self.loaded:
            self.loaded = True
            await self.engine.load_version(1, self.path)
        return result

    async def load_version(self, version, path):
        await self.engine.load_version(version, path)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_version_loaded_mid_episode_samples_from_the_next_turn_and_turns_record_it(engine, versions):
    """Episodes consult (several turns each) while version 1 loads after the very first turn: each
    turn's behaviour log-probs are those of the version it records, and both versions occur."""
    (_, v1), learner = versions
    assert engine.version == 0
    wrapped = LoadsAfterTheFirstTurn(engine, v1)
    cfg = RolloutConfig(max_new_tokens=32, max_context=400, max_queries=3)
    anneal = AnnealState(step=0, acceptance=1.0, budget=3, penalty=0.0)
    task = PromptTask(prompt_id="p", problem="12+3*4", answer="24")
    trajs = await asyncio.gather(*(run_episode(wrapped, ArithmeticExperts(), task, anneal, cfg, i) for i in range(6)))
    assert engine.version == 1
    seen = set()
    for t in trajs:
        ids = t.token_ids.tolist()
        for turn in t.turns:
            seen.add(turn.policy_version)
            want = learner.logprobs(turn.policy_version, ids[: turn.end], turn.start)
            assert t.behaviour_logprobs[turn.start : turn.end].tolist() == pytest.approx(want, abs=LOGPROB_TOL)
    assert seen == {0, 1}
    assert any(len(t.turns) > 1 and t.turns[0].policy_version == 0 and t.turns[-1].policy_version == 1 for t in trajs)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_version_that_does_not_verify_is_refused_and_the_engine_keeps_serving_its_own(
    engine, versions, tmp_path
):
    before = engine.version
    with pytest.raises(Exception, match="unreadable manifest"):
        await engine.load_version(7, tmp_path / "missing")
    assert engine.version == before
    request = turn_request(engine.tokenizer, PROBLEMS[0], seed=5)
    result, version = await engine.sample(request)
    ids = request.prompt_ids + result.token_ids
    assert version == before
    assert result.logprobs == pytest.approx(versions[1].logprobs(before, ids, len(request.prompt_ids)), abs=LOGPROB_TOL)
