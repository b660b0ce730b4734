"""The consult action under a user's own model: a byte-level BPE tokenizer trained in the test (the
tags are plain text, split into several tokens and merged with their neighbours), its ChatML
template, a tiny Qwen2 briefly fine-tuned to consult (``tests/bpe_model.py``)."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from bpe_model import CHATML, build_model, build_tokenizer, prompt, write_problems
from helpers import FakeBackend, ServerThread

from eapo.core.config import ExpertBackend, ExpertServerConfig, GatewayConfig, RolloutConfig
from eapo.core.net import free_port
from eapo.dev.world.tasks import evaluate
from eapo.inference.cpu_server import create_app
from eapo.inference.model import load_model
from eapo.inference.sampling import SampleRequest, completed_stop, generate_batch, text_decoder
from expert_gateway.app import create_app as create_gateway
from learner.loss import token_logprobs
from proto import AnnealState, ConsultResult, PromptTask
from proto import episode_format as fmt
from proto.weights import verify_version, version_dir
from rollout_service.consult import ParsedConsult, parse_consult
from rollout_service.engine import TransformersEngine
from rollout_service.episode import run_episode
from rollout_service.expert_client import ExpertClient
from rollout_service.remote_engine import RemotePolicyEngine

BLOCK = "<consult>3*4; 2+3*4</consult><expert>"  # the closing '>' merges with the next '<'


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def own_model(tmp_path_factory) -> SimpleNamespace:
    """The fine-tuned policy as a Hugging Face model directory, and the model and tokenizer loaded."""
    root = build_model(tmp_path_factory.mktemp("own-model"))
    model, tokenizer = load_model(root)
    return SimpleNamespace(dir=root, model=model, tok=tokenizer)


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text)]


def test_the_closing_tag_is_no_token_and_merges_with_what_follows(tok):
    """The premise: no '</consult>' token; its '>' is inside a '><' token that straddles two tags."""
    assert fmt.CONSULT_CLOSE not in tok.get_vocab()
    parts = pieces(tok, BLOCK)
    assert "".join(parts) == BLOCK
    assert "><" in parts and fmt.CONSULT_CLOSE not in parts


def test_the_turn_ends_at_the_first_token_completing_the_tag(tok):
    ids = tok.encode(BLOCK)
    decode = text_decoder(tok)
    ends = [n for n in range(1, len(ids) + 1) if completed_stop(decode, ids[:n], [fmt.CONSULT_CLOSE])]
    first = ends[0]
    assert tok.decode(ids[first - 1 : first]) == "><"  # the token that completes the tag runs past it
    assert tok.decode(ids[:first]).endswith(fmt.CONSULT_CLOSE + "<")
    assert not completed_stop(decode, ids[: first - 1], [fmt.CONSULT_CLOSE])


class ScriptModel(torch.nn.Module):
    """A causal LM that puts all its mass on the next token of a script (per row), whatever the input:
    the sampler's stop rule is then checked on an exact, known token sequence."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None):
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -1e4)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_the_cpu_engine_stops_on_a_merged_tag_and_keeps_the_ids_as_sampled(tok):
    script = tok.encode(BLOCK + "12</expert>")
    model = ScriptModel(script, len(tok))
    stop = [fmt.CONSULT_CLOSE]
    request = SampleRequest([1, 2, 3], 40, frozenset({tok.eos_token_id}), tuple(stop), temperature=0.0)
    (result,) = generate_batch(model, [request], tok.pad_token_id, tok)
    n = next(n for n in range(1, len(script) + 1) if completed_stop(text_decoder(tok), script[:n], stop))
    assert result.token_ids == script[:n]  # nothing sampled after the tag's token; that token kept
    assert (result.finish, result.stop_string) == ("stop", fmt.CONSULT_CLOSE)
    assert len(result.logprobs) == n
    with pytest.raises(ValueError, match="tokenizer"):
        generate_batch(model, [request], tok.pad_token_id)  # stop strings cannot be checked without it


@pytest.mark.slow  # the own_model fixture fine-tunes a model (minutes under load)
def test_the_fine_tuned_policy_consults_and_every_turn_ends_at_the_tag(own_model):
    tok = own_model.tok
    requests = [
        SampleRequest(tok.encode(prompt(tok, q)), 40, frozenset({tok.eos_token_id}), (fmt.CONSULT_CLOSE,), seed=i)
        for i, q in enumerate(["2+3*4", "7*8-9", "12+3", "9-8"] * 2)
    ]
    results = generate_batch(own_model.model, requests, tok.pad_token_id, tok)
    consulted = [r for r in results if r.stop_string == fmt.CONSULT_CLOSE]
    assert len(consulted) >= len(results) // 2  # the fine-tuned policy consults
    for r in consulted:
        text = tok.decode(r.token_ids)
        assert text.count(fmt.CONSULT_CLOSE) == 1  # ended at the first tag, not later
        assert fmt.CONSULT_CLOSE not in tok.decode(r.token_ids[:-1])  # the last token completed it


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_cpu_server_and_remote_engine_stop_as_vllm_does(own_model, tok):
    """Token-id prompt, stop string: the server returns the ids as sampled (the completing token
    included), the text cut at the tag (or after it with include_stop_str_in_output), stop_reason the
    tag; the remote engine makes the same turn as the in-process sampler."""
    import httpx

    model_tok = own_model.tok
    ids = model_tok.encode(prompt(model_tok, "2+3*4"))
    # seed 4: a seed under which this policy writes a consult block (most do)
    request = SampleRequest(ids, 40, frozenset({model_tok.eos_token_id}), (fmt.CONSULT_CLOSE,), seed=4)
    (local,) = generate_batch(own_model.model, [request], model_tok.pad_token_id, model_tok)
    assert local.stop_string == fmt.CONSULT_CLOSE
    with ServerThread(create_app(ExpertServerConfig(model="policy", seed=0), own_model.dir), free_port()) as server:
        body = {"model": "policy", "prompt": ids, "max_tokens": 40, "seed": 4, "stop": [fmt.CONSULT_CLOSE]}
        body |= {"logprobs": 0, "return_tokens_as_token_ids": True, "stop_token_ids": [model_tok.eos_token_id]}
        async with httpx.AsyncClient() as client:
            cut = (await client.post(f"{server.url}/v1/completions", json=body)).json()["choices"][0]
            kept = (
                await client.post(f"{server.url}/v1/completions", json=body | {"include_stop_str_in_output": True})
            ).json()["choices"][0]
        assert [int(t.removeprefix("token_id:")) for t in cut["logprobs"]["tokens"]] == local.token_ids
        assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", fmt.CONSULT_CLOSE)
        full = model_tok.decode(local.token_ids)
        assert cut["text"] == full[: full.index(fmt.CONSULT_CLOSE)]
        assert kept["text"] == cut["text"] + fmt.CONSULT_CLOSE
        engine = RemotePolicyEngine([server.url], "policy", own_model.dir, version=0)
        try:
            remote, _ = await engine.sample(request)
        finally:
            await engine.close()
    assert remote.token_ids == local.token_ids and remote.stop_string == fmt.CONSULT_CLOSE
    assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-4)


def test_the_parser_reads_the_queries_up_to_a_tag_that_a_token_ran_past(tok):
    ids = tok.encode(BLOCK)
    n = next(n for n in range(1, len(ids) + 1) if completed_stop(text_decoder(tok), ids[:n], [fmt.CONSULT_CLOSE]))
    turn = tok.decode(ids[:n])
    assert not turn.endswith(fmt.CONSULT_CLOSE)  # the last token ran past the tag
    assert parse_consult(turn, max_queries=3) == ParsedConsult(["3*4", "2+3*4"], [])


class ArithmeticExperts:
    """Exact experts, in process: the episode's own bookkeeping is what is under test here."""

    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None) -> list[ConsultResult]:
        return [ConsultResult(index=i, answer=self.answer(q)) for i, q in enumerate(queries)]

    @staticmethod
    def answer(query: str) -> str:
        try:
            return str(evaluate(query))
        except (ValueError, KeyError, IndexError, ZeroDivisionError):  # the policy's query is not arithmetic
            return "no idea"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_episodes_consult_with_exact_masks_and_the_learners_log_probs(own_model):
    """Turns end on the tag; the recorded queries are the parsed block; injected blocks are exactly the
    mask's zeros after the prompt; each sampled token's behaviour log-prob is the learner's forward."""
    engine = TransformersEngine(own_model.dir, version=0)
    cfg = RolloutConfig(max_new_tokens=32, max_context=400, max_queries=3)
    anneal = AnnealState(step=0, acceptance=0.5, budget=3, penalty=0.0)
    task = PromptTask(prompt_id="p", problem="12+3*4", answer="24")
    trajs = await asyncio.gather(*(run_episode(engine, ArithmeticExperts(), task, anneal, cfg, i) for i in range(8)))
    await engine.close()
    tok = engine.tokenizer
    assert sum(bool(t.consults) for t in trajs) >= 4  # the policy consults
    for t in trajs:
        ids = t.token_ids.tolist()
        assert tok.decode(ids[: t.prompt_len]) == prompt(tok, task.problem)  # its own chat template
        policy = np.zeros(len(ids), dtype=bool)
        for turn in t.turns:
            policy[turn.start : turn.end] = True
            if turn.finish == "consult":
                text = tok.decode(ids[turn.start : turn.end])
                assert fmt.CONSULT_CLOSE in text
                queries = parse_consult(text, cfg.max_queries).queries
                assert [c.query for c in t.consults if t.turns[c.turn] is turn] == queries
        np.testing.assert_array_equal(t.loss_mask, policy)  # 1 exactly on sampled tokens
        for c in t.consults:
            shown = c.detail if c.accepted else None
            assert tok.decode(ids[c.injected_start : c.injected_end]) == fmt.expert_block(shown)
        with torch.no_grad():
            x = torch.tensor([ids])
            learner = token_logprobs(own_model.model(input_ids=x).logits, x)[0].numpy()
        np.testing.assert_allclose(t.behaviour_logprobs[policy], learner[policy], atol=2e-4)


@pytest.mark.asyncio
async def test_queries_go_to_several_expert_pools_in_turn():
    """model.experts names two pools: the query in slot i of its block goes to pool i mod 2, in parallel,
    answers in order."""
    import aiohttp

    with FakeBackend("solver-pod", model="solver") as a, FakeBackend("calc-pod", model="calculator") as b:
        backends = [ExpertBackend(model="solver", url=a.url), ExpertBackend(model="calculator", url=b.url)]
        with ServerThread(create_gateway(GatewayConfig(backends=backends)), free_port()) as gateway:
            async with aiohttp.ClientSession() as session:
                client = ExpertClient(session, gateway.url, ["solver", "calculator"], max_tokens=8, timeout_s=10)
                answers = await client.consult(["1+1", "2+2", "3+3"], "e0")
                single = await client.consult(["4+4"], "e1")
                second = await client.consult(["5+5"], "e2", slots=[1])  # the block's first query withheld
    assert [(r.index, r.answer) for r in answers] == [(0, "solver-pod"), (1, "calc-pod"), (2, "solver-pod")]
    assert [r.answer for r in single] == ["solver-pod"]
    assert [(r.index, r.answer) for r in second] == [(0, "calc-pod")]


@pytest.mark.e2e
def test_eapo_up_trains_and_eapo_eval_judges_a_users_own_model_through_config_alone(own_model, tiny_world, tmp_path):
    """`model:` and `data:` point at the BPE model and a JSONL set of the user's own: the stack trains
    it 8 steps, its episodes consult, and `eapo eval` answers with the result."""
    run_dir = tmp_path / "run"
    train = write_problems(tmp_path / "train.jsonl", 48, seed=1)
    held_out = write_problems(tmp_path / "held-out.jsonl", 8, seed=2)
    config = {
        "run_dir": str(run_dir),
        "world": tiny_world.model_dump(mode="json"),  # built already: `eapo up` finds it cached
        "model": {"policy": str(own_model.dir), "experts": ["expert"]},
        "data": {"train": {"path": str(train), "layout": "aime"}, "eval": {"path": str(held_out), "layout": "aime"}},
        "expert_server": {"pool": [str(Path(tiny_world.dir) / "expert")]},  # an absolute checkpoint path
        "learner": {"steps": 8, "batch_groups": 1, "dynamic_sampling": False, "lr": 1e-4},
        "rollout": {"group_size": 2, "max_groups_in_flight": 2, "max_new_tokens": 24, "max_context": 400},
        "anneal": {
            "budget": {"kind": "constant", "start": 3, "end": 3},
            "penalty": {"kind": "constant", "start": 0.1, "end": 0.1},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    up = subprocess.run(
        [sys.executable, "-m", "eapo.cli", "up", "--config", str(path)], capture_output=True, text=True, timeout=900
    )
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-1] == 8
    assert sum(m["calls_per_episode"] for m in metrics) > 0  # consult blocks were detected under BPE
    final = version_dir(run_dir / "weights", 8)
    assert verify_version(final).version == 8
    out = tmp_path / "eval.json"
    argv = ["eval", "--config", str(path), "--model", str(final), "--samples", "2", "--out", str(out)]
    evaluated = subprocess.run([sys.executable, "-m", "eapo.cli", *argv], capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dataset"] == str(held_out) and report["summary"]["problems"] == 8
    assert report["expert_calls_per_episode"] == 0  # judged alone


def test_a_template_without_a_system_role_gets_the_instruction_in_the_user_message(tok):
    strict = copy.deepcopy(tok)
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    strict.chat_template = refuse + CHATML
    text = fmt.render_prompt(strict, fmt.training_messages("2+3", 3))
    assert text == f"<|im_start|>user\n{fmt.consult_instruction(3)}\n\n2+3<|im_end|>\n<|im_start|>assistant\n"
    assert (
        fmt.render_prompt(strict, fmt.eval_messages("2+3"))
        == "<|im_start|>user\n2+3<|im_end|>\n<|im_start|>assistant\n"
    )
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        fmt.render_prompt(bare, fmt.eval_messages("2+3"))
