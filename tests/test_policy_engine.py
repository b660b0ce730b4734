"""The CPU policy engine on the tiny world's real policy: batching is exact, seeds replay, eval mode
grants no consult action."""

import asyncio

import aiohttp
import numpy as np
import pytest

from eapo.core.config import RolloutConfig, load_config
from eapo.dev.world.tasks import evaluate
from eapo.inference.model import load_model
from eapo.inference.sampling import SampleRequest, generate_batch
from proto import AnnealState, PromptTask
from proto import episode_format as fmt
from rollout_service.engine import TransformersEngine
from rollout_service.episode import run_episode
from rollout_service.evaluate import evaluate as evaluate_dataset
from rollout_service.expert_client import ExpertClient, PolicyExperts

TASKS = [
    PromptTask(prompt_id=f"t{i}", problem=p, answer=str(evaluate(p)))
    for i, p in enumerate(["2+3*4", "7*8-9", "12+34*5-6", "9-8"])
]

# The tiny policy seldom writes a well-formed consult block: tests that need one pin a rollout seed under
# which it does, rather than follow the config's default seed.
SEED = 1


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_batched_generation_equals_one_at_a_time(world_dir, temperature):
    model, tok = load_model(world_dir / "policy")
    reqs = [
        SampleRequest(
            tok.encode(fmt.training_prompt(t.problem)),
            24,
            frozenset({tok.eos_token_id}),
            temperature=temperature,
            seed=i,
        )
        for i, t in enumerate(TASKS)
    ]
    together = generate_batch(model, reqs, tok.pad_token_id)
    for req, batched in zip(reqs, together, strict=True):
        alone = generate_batch(model, [req], tok.pad_token_id)[0]
        assert batched.token_ids == alone.token_ids  # left padding and positions are exact
        np.testing.assert_allclose(batched.logprobs, alone.logprobs, atol=1e-4)


@pytest.mark.asyncio
async def test_identical_seeds_replay_an_identical_episode(world_dir, gateway):
    engine = TransformersEngine(world_dir / "policy", version=0)
    cfg = RolloutConfig(max_new_tokens=32)
    anneal = AnnealState(step=0, acceptance=0.5, budget=3, penalty=0.0)
    async with aiohttp.ClientSession() as session:
        experts = ExpertClient(session, gateway, "expert", max_tokens=16, timeout_s=30)
        first = await run_episode(engine, experts, TASKS[2], anneal, cfg, sample_index=3)
        again = await run_episode(engine, experts, TASKS[2], anneal, cfg, sample_index=3)
        other = await run_episode(engine, experts, TASKS[2], anneal, cfg, sample_index=4)
    await engine.close()
    np.testing.assert_array_equal(first.token_ids, again.token_ids)
    assert first.seed == again.seed != other.seed
    assert [(c.draw, c.accepted) for c in first.consults] == [(c.draw, c.accepted) for c in again.consults]


@pytest.mark.asyncio
async def test_eval_mode_never_consults(world_dir):
    engine = TransformersEngine(world_dir / "policy", version=0)
    cfg = RolloutConfig(max_new_tokens=40)
    anneal = AnnealState(step=0, acceptance=1.0, budget=4, penalty=0.0)
    trajs = await asyncio.gather(*(run_episode(engine, None, t, anneal, cfg, i) for i, t in enumerate(TASKS * 4)))
    await engine.close()
    tok = engine.tokenizer
    for traj in trajs:
        assert traj.consults == [] and traj.rejected_blocks == 0
        assert traj.loss_mask[traj.prompt_len :].all()  # nothing was injected
        assert not tok.decode(traj.token_ids[: traj.prompt_len].tolist()).startswith(fmt.TOOLS)
        assert len(traj.turns) == 1


@pytest.mark.asyncio
async def test_self_collaboration_answers_queries_with_the_policy_itself(world_dir):
    engine = TransformersEngine(world_dir / "policy", version=0)
    experts = PolicyExperts(engine, max_tokens=12)
    answers = await experts.consult(["2+3", "7*8"], "e0")
    assert [a.index for a in answers] == [0, 1] and all(a.error is None and a.answer is not None for a in answers)
    again = await experts.consult(["2+3"], "e1")  # greedy: the same query, the same answer
    assert again[0].answer == answers[0].answer
    cfg = RolloutConfig(max_new_tokens=40, seed=SEED)
    anneal = AnnealState(step=0, acceptance=1.0, budget=4, penalty=0.0)
    trajs = await asyncio.gather(*(run_episode(engine, experts, t, anneal, cfg, i) for i, t in enumerate(TASKS * 4)))
    await engine.close()
    consults = [c for t in trajs for c in t.consults]
    assert consults and all(c.accepted and c.outcome == "answer" for c in consults)  # p = 1, nothing failed


@pytest.mark.parametrize("mode", ["expert-assisted", "self-collaboration"])
async def test_eval_baselines_consult_and_report_the_call_rate(tiny_world, gateway, tmp_path, mode):
    cfg = load_config(None, world=tiny_world.model_dump(mode="json"), rollout={"gateway_url": gateway, "seed": SEED})
    report = await evaluate_dataset(cfg, tiny_world.dir / "policy", tiny_world.dir / "eval.jsonl", "world", 2, 6, mode)
    assert report["mode"] == mode and report["summary"]["problems"] == 6
    assert report["expert_calls_per_episode"] > 0  # the training prompt grants the consult action
    alone = await evaluate_dataset(cfg, tiny_world.dir / "policy", tiny_world.dir / "eval.jsonl", "world", 2, 6)
    assert alone["expert_calls_per_episode"] == 0


@pytest.mark.slow
def test_eapo_eval_writes_a_report(tiny_world, tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"world": tiny_world.model_dump(mode="json")}))
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eapo.cli",
            "eval",
            "--config",
            str(config),
            "--samples",
            "2",
            "--limit",
            "6",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["summary"]["problems"] == 6 and report["summary"]["samples_per_problem"] == 2
    assert len(report["scores"]) == 6 and all(len(v) == 2 for v in report["scores"].values())
    mean = sum(sum(v) for v in report["scores"].values()) / 12
    assert report["summary"]["mean_score"] == pytest.approx(mean)
    assert out.with_suffix(".config.yaml").exists()
    assert "mean score" in proc.stdout


def test_top_p_keeps_the_smallest_head_reaching_p():
    import torch

    from eapo.inference.sampling import _filter_top_p

    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = torch.softmax(_filter_top_p(logits, 0.7), dim=-1)
    assert kept.tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375])
