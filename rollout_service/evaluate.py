"""``eapo eval``: a policy checkpoint answers a dataset, N samples per problem; writes mean@N, variance
and pass@k with every sample's score. Modes (the paper's baselines):

* ``alone`` — minimal prompt, no consult action (how a trained policy is judged);
* ``expert-assisted`` — the training prompt, experts answer through the gateway and every answer is
  accepted (p = 1, B = the budget's start), no training: the workflow EAPO is compared with;
* ``self-collaboration`` — the same, but the policy answers its own queries (experts = the policy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from eapo.core.config import EAPOConfig, EvalMode
from eapo.core.data import Layout, load_problems, load_split
from proto import AnnealState, PromptTask, Trajectory
from rollout_service.engine import TransformersEngine
from rollout_service.episode import run_episode
from rollout_service.expert_client import ExpertClient, Experts, PolicyExperts, gateway_session
from rollout_service.metrics_eval import summarize

log = logging.getLogger(__name__)

# Evaluation alone is one uninterrupted answer: one turn, nothing to accept, nothing to charge.
EVAL_STATE = AnnealState(step=0, acceptance=0.0, budget=1, penalty=0.0)


def assisted_state(cfg: EAPOConfig) -> AnnealState:
    """Every expert answer shown, the full turn budget, no penalty (nothing is trained)."""
    return AnnealState(step=0, acceptance=1.0, budget=max(1, round(cfg.anneal.budget.start)), penalty=0.0)


async def evaluate(
    cfg: EAPOConfig,
    model: Path,
    dataset: Path | None,
    layout: str | Layout,
    samples: int,
    limit: int | None = None,
    mode: EvalMode = "alone",
) -> dict:
    """``dataset`` in ``layout``; None: the configured ``data.eval`` (its file and layout)."""
    problems = (load_split(cfg, "eval") if dataset is None else load_problems(dataset, layout))[:limit]
    engine = TransformersEngine(model, version=0, max_batch=cfg.rollout.max_batch)
    slots = asyncio.Semaphore(cfg.rollout.max_batch)
    t0 = time.monotonic()
    async with gateway_session(cfg) as session:
        experts: Experts | None = None
        state = EVAL_STATE
        if mode == "expert-assisted":
            experts, state = ExpertClient.for_rollout(session, cfg), assisted_state(cfg)
        elif mode == "self-collaboration":
            experts, state = PolicyExperts(engine, cfg.rollout.expert_max_tokens), assisted_state(cfg)

        async def one(task: PromptTask, i: int) -> Trajectory:
            async with slots:
                return await run_episode(engine, experts, task, state, cfg.rollout, i)

        tasks = [p.task() for p in problems]
        episodes = await asyncio.gather(*(one(t, i) for t in tasks for i in range(samples)))
    await engine.close()
    scores = [e.score for e in episodes]
    calls = [len(e.consults) for e in episodes]
    per_problem = {t.prompt_id: list(scores[j * samples : (j + 1) * samples]) for j, t in enumerate(tasks)}
    summary = summarize(per_problem, ks=tuple(sorted({1, samples})))
    f1s = [e.f1 for e in episodes if e.f1 is not None]
    if f1s:  # short-answer tasks
        summary["mean_f1"] = sum(f1s) / len(f1s)
    log.info(
        "evaluated (%s) %d problems x %d samples in %.0fs: mean %.3f",
        mode,
        len(tasks),
        samples,
        time.monotonic() - t0,
        summary["mean_score"],
    )
    return {
        "model": str(model),
        "mode": mode,
        "dataset": str(dataset or cfg.data_path("eval")),
        "expert_calls_per_episode": sum(calls) / len(calls) if calls else 0.0,
        "seed": cfg.rollout.seed,
        "summary": summary,
        "scores": per_problem,
        "seconds": round(time.monotonic() - t0, 1),
    }


def run_eval(
    cfg: EAPOConfig,
    model: Path | None,
    dataset: Path | None,
    layout: str | Layout,
    samples: int,
    out: Path,
    limit: int | None,
    mode: EvalMode = "alone",
) -> dict:
    """Defaults: the configured policy (``model.policy``) and evaluation set (``data.eval``, whose layout
    then applies)."""
    model = model or cfg.policy_path
    report = asyncio.run(evaluate(cfg, model, dataset, layout, samples, limit, mode))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    cfg.dump_yaml(out.with_suffix(".config.yaml"))  # the config next to the result
    return report
