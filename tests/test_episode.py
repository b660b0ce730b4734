"""Episode semantics with a scripted policy, the real gateway and real CPU expert servers."""

from pathlib import Path

import aiohttp
import numpy as np
import pytest

from eapo.core.config import RolloutConfig
from eapo.inference.model import load_model
from eapo.inference.sampling import SampleRequest, SampleResult
from proto import AnnealState, PromptTask
from proto import episode_format as fmt
from rollout_service.episode import run_episode
from rollout_service.expert_client import ExpertClient

pytestmark = pytest.mark.asyncio


class ScriptedEngine:
    """Plays back fixed turns (as token ids) with fixed log-probs: a policy whose choices we know."""

    def __init__(self, tokenizer, turns: list[str], version: int = 5):
        self.tokenizer = tokenizer
        self.turns = [tokenizer.encode(t) for t in turns]
        self.calls: list[list[int]] = []
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        self.calls.append(list(request.prompt_ids))
        ids = self.turns[len(self.calls) - 1]
        stop = next((s for s in request.stop_strings if s in self.tokenizer.decode(ids)), None)
        finish = "stop" if ids[-1] in request.stop_ids or stop is not None else "length"
        return SampleResult(ids, [-0.5] * len(ids), finish, stop), self._version

    async def load_version(self, version: int, path: Path) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(world_dir):
    return load_model(world_dir / "policy")[1]


def anneal(p: float, budget: int = 4) -> AnnealState:
    return AnnealState(step=0, acceptance=p, budget=budget, penalty=0.0)


TASK = PromptTask(prompt_id="t1", problem="2+3*4", answer="14")
CONSULT_TURN = "<consult>3*4; 2+3*4</consult>"
ANSWER_TURN = "2+12=14 \\boxed{14}<eos>"


async def episode(tokenizer, gateway_url, p, turns, budget=4, cfg=None, url=None):
    engine = ScriptedEngine(tokenizer, turns)
    async with aiohttp.ClientSession() as session:
        experts = ExpertClient(session, url or gateway_url, "expert", max_tokens=24, timeout_s=10)
        traj = await run_episode(engine, experts, TASK, anneal(p, budget), cfg or RolloutConfig(), 0)
    return engine, traj


async def test_masks_cover_exactly_the_policy_tokens(tokenizer, gateway):
    engine, traj = await episode(tokenizer, gateway, 1.0, [CONSULT_TURN, ANSWER_TURN])
    ids, mask = traj.token_ids, traj.loss_mask
    assert traj.finish == "answer" and traj.score == 1.0 and traj.final_answer == "14"
    assert not mask[: traj.prompt_len].any()
    policy_positions = np.concatenate([np.arange(t.start, t.end) for t in traj.turns])
    assert set(np.flatnonzero(mask)) == set(policy_positions.tolist())
    for c in traj.consults:  # expert answers and notes: observations only
        assert not mask[c.injected_start : c.injected_end].any()
        injected = tokenizer.decode(ids[c.injected_start : c.injected_end].tolist())
        assert injected.startswith(fmt.EXPERT_OPEN) and injected.endswith(fmt.EXPERT_CLOSE)
    assert np.all(traj.behaviour_logprobs[mask] == -0.5)
    assert np.all(traj.behaviour_logprobs[~mask] == 0)
    # token-in, token-out: each turn's input extends the previous sequence exactly
    assert engine.calls[1][: len(engine.calls[0])] == engine.calls[0]
    assert ids[: len(engine.calls[1])].tolist() == engine.calls[1]
    assert [t.policy_version for t in traj.turns] == [5, 5]


async def test_acceptance_zero_shows_only_unavailable_notes_and_asks_no_expert(tokenizer):
    from eapo.core.net import free_port

    # nothing listens there: an expert asked would be an "error", not "not_asked"
    _, traj = await episode(tokenizer, None, 0.0, [CONSULT_TURN, ANSWER_TURN], url=f"http://127.0.0.1:{free_port()}")
    assert len(traj.consults) == 2
    assert all(c.outcome == "not_asked" and not c.accepted for c in traj.consults), traj.consults
    for c in traj.consults:
        text = tokenizer.decode(traj.token_ids[c.injected_start : c.injected_end].tolist())
        assert text == fmt.expert_block(None)


async def test_acceptance_follows_p_and_draws_are_recorded(tokenizer, gateway):
    _, traj = await episode(tokenizer, gateway, 0.5, [CONSULT_TURN, ANSWER_TURN])
    for c in traj.consults:
        assert c.accepted == (c.draw < 0.5) and (c.outcome == "not_asked") == (c.draw >= 0.5)
        text = tokenizer.decode(traj.token_ids[c.injected_start : c.injected_end].tolist())
        assert (text != fmt.expert_block(None)) == c.accepted


async def test_the_last_turn_of_the_budget_offers_no_consult(tokenizer, gateway):
    # budget 2: the second turn is the last, so a consult block there does not end it and is not sent;
    # the policy goes on and its answer is judged as written
    engine, traj = await episode(tokenizer, gateway, 1.0, [CONSULT_TURN, CONSULT_TURN + ANSWER_TURN], budget=2)
    assert [t.finish for t in traj.turns] == ["consult", "eos"] and len(engine.calls) == 2
    assert len(traj.consults) == 2  # the first block's two queries only
    assert traj.finish == "answer" and traj.score == 1.0


async def test_a_budget_of_one_is_a_plain_answer_under_the_evaluation_prompt(tokenizer, gateway):
    engine, traj = await episode(tokenizer, gateway, 1.0, [CONSULT_TURN + ANSWER_TURN], budget=1)
    assert tokenizer.decode(engine.calls[0]) == fmt.eval_prompt(TASK.problem)  # no consult action granted
    assert traj.consults == [] and len(traj.turns) == 1 and traj.finish == "answer"


async def test_unreachable_gateway_makes_experts_unavailable_and_the_episode_goes_on(tokenizer):
    from eapo.core.net import free_port

    _, traj = await episode(tokenizer, None, 1.0, [CONSULT_TURN, ANSWER_TURN], url=f"http://127.0.0.1:{free_port()}")
    assert traj.finish == "answer" and traj.score == 1.0
    assert [c.outcome for c in traj.consults] == ["error", "error"]
    assert not any(c.accepted for c in traj.consults)


async def test_malformed_block_is_counted_not_sent(tokenizer, gateway):
    _, traj = await episode(tokenizer, gateway, 1.0, ["<consult> ; </consult>", ANSWER_TURN])
    assert traj.rejected_blocks == 1 and traj.consults == []
    assert traj.finish == "answer"


async def test_acceptance_rate_matches_p_within_a_binomial_bound(tokenizer, gateway):
    p, episodes = 0.3, 40
    engine = ScriptedEngine(tokenizer, [CONSULT_TURN, ANSWER_TURN])
    draws = []
    async with aiohttp.ClientSession() as session:
        experts = ExpertClient(session, gateway, "expert", max_tokens=8, timeout_s=30)
        for i in range(episodes):
            engine.calls.clear()  # replay the same two turns in every episode
            traj = await run_episode(engine, experts, TASK, anneal(p), RolloutConfig(), i)
            draws += [c for c in traj.consults if c.outcome != "error"]
    n = len(draws)
    accepted = sum(c.accepted for c in draws)
    assert n >= 60
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(accepted - n * p) <= 4 * sigma, (accepted, n)
    assert all(c.accepted == (c.draw < p) for c in draws)


async def test_an_expert_timeout_becomes_unavailable_and_the_episode_goes_on(tokenizer):
    import asyncio as aio

    from fastapi import FastAPI
    from helpers import ServerThread

    from eapo.core.config import ExpertBackend, GatewayConfig
    from eapo.core.net import free_port
    from expert_gateway.app import create_app

    slow = FastAPI()

    @slow.post("/v1/chat/completions")
    async def late() -> dict:
        await aio.sleep(3)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "too late"}}]}

    with ServerThread(slow, free_port()) as backend:
        cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=backend.url)])
        with ServerThread(create_app(cfg), free_port()) as gw:
            engine = ScriptedEngine(tokenizer, [CONSULT_TURN, ANSWER_TURN])
            async with aiohttp.ClientSession() as session:
                experts = ExpertClient(session, gw.url, "expert", max_tokens=8, timeout_s=0.5)
                traj = await run_episode(engine, experts, TASK, anneal(1.0), RolloutConfig(), 0)
    assert [c.outcome for c in traj.consults] == ["error", "error"]
    assert not any(c.accepted for c in traj.consults)
    assert traj.finish == "answer" and traj.score == 1.0


async def test_the_tiny_worlds_template_renders_the_prompts_its_policy_learned(tokenizer):
    """Prompts now come from the chat template; the tiny world's renders the strings its SFT used."""
    assert fmt.render_prompt(tokenizer, fmt.training_messages("2+3", 3)) == fmt.training_prompt("2+3")
    assert fmt.render_prompt(tokenizer, fmt.eval_messages("2+3")) == fmt.eval_prompt("2+3")


async def test_the_transcript_keeps_ids_mask_and_log_probs_aligned(tokenizer):
    from eapo.inference.sampling import SampleResult
    from rollout_service.transcript import Transcript

    t = Transcript.for_prompt(tokenizer, TASK.problem, 3)
    sampled = tokenizer.encode(CONSULT_TURN)
    turn = t.add_turn(SampleResult(sampled, [-0.5] * len(sampled), "stop", fmt.CONSULT_CLOSE), 9, "consult")
    start, end = t.inject(fmt.expert_block("14"))
    ids, mask, logprobs = t.arrays()
    assert (turn.start, turn.end, turn.policy_version) == (t.prompt_len, start, 9) and end == len(t) == len(ids)
    assert len(mask) == len(logprobs) == len(ids)
    assert mask[turn.start : turn.end].all() and not mask[: turn.start].any() and not mask[start:end].any()
    assert np.all(logprobs[mask] == -0.5) and np.all(logprobs[~mask] == 0)
    assert t.text(turn) == CONSULT_TURN and tokenizer.decode(ids[start:end].tolist()) == fmt.expert_block("14")


class RecordingExperts:
    """Answers every query and records what it was asked, with the queries' places in their block."""

    def __init__(self):
        self.asked: list[tuple[list[str], list[int] | None]] = []

    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None):
        from proto import ConsultResult

        self.asked.append((queries, slots))
        return [ConsultResult(index=i, answer=f"answer {q}") for i, q in enumerate(queries)]


async def test_only_the_queries_the_draw_accepts_are_sent_and_they_keep_their_places(tokenizer):
    """The draws come from the episode's seeded stream, so a seed with one query of two accepted is found
    by search; the accepted one goes out alone, keeping its place in the block (which routes it)."""
    experts = RecordingExperts()
    for index in range(50):
        experts.asked.clear()
        engine = ScriptedEngine(tokenizer, [CONSULT_TURN, ANSWER_TURN])
        traj = await run_episode(engine, experts, TASK, anneal(0.5), RolloutConfig(), index)
        places = [i for i, c in enumerate(traj.consults) if c.draw < 0.5]
        if places == [1]:
            break
    assert places == [1], "no seed in 50 accepted only the second query"
    assert experts.asked == [(["2+3*4"], [1])]
    assert [c.outcome for c in traj.consults] == ["not_asked", "answer"]
    assert [c.detail for c in traj.consults] == ["", "answer 2+3*4"]


class WrongExperts:
    """Answers every query with a wrong equation: the expert's work, not the policy's."""

    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None):
        from proto import ConsultResult

        return [ConsultResult(index=i, answer="3*4=11 \\boxed{11}") for i, _ in enumerate(queries)]


async def test_an_episode_records_whether_the_work_of_its_answer_turn_holds(tokenizer):
    for answer, holds in ((ANSWER_TURN, True), ("2+12=15 \\boxed{14}<eos>", False), ("\\boxed{14}<eos>", None)):
        engine = ScriptedEngine(tokenizer, [CONSULT_TURN, answer])
        traj = await run_episode(engine, WrongExperts(), TASK, anneal(1.0), RolloutConfig(), 0)
        assert traj.consults and all(c.accepted for c in traj.consults)  # the wrong answers were shown
        assert traj.score == 1.0 and traj.work_holds is holds  # judged on the answer's turn alone
