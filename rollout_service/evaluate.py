"""``eapo eval``: a policy checkpoint answers a dataset alone (minimal prompt, no consult action),
N samples per problem; writes mean@N, variance and pass@k with every sample's score."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from eapo.config import EAPOConfig
from proto import AnnealState, PromptTask
from rollout_service.datasets import Layout, load_problems
from rollout_service.engine import TransformersEngine
from rollout_service.episode import run_episode
from rollout_service.metrics_eval import summarize

log = logging.getLogger(__name__)

# Evaluation is one uninterrupted answer: one turn, nothing to accept, nothing to charge.
EVAL_STATE = AnnealState(step=0, acceptance=0.0, budget=1, penalty=0.0)


async def evaluate(
    cfg: EAPOConfig, model: Path, dataset: Path, layout: str | Layout, samples: int, limit: int | None = None
) -> dict:
    problems = load_problems(dataset, layout)[:limit]
    engine = TransformersEngine(model, version=0, max_batch=cfg.rollout.max_batch)
    slots = asyncio.Semaphore(cfg.rollout.max_batch)
    t0 = time.monotonic()

    async def one(task: PromptTask, i: int) -> float:
        async with slots:
            return (await run_episode(engine, None, task, EVAL_STATE, cfg.rollout, i)).score

    tasks = [PromptTask(prompt_id=p.id, problem=p.problem, answer=p.answer, tier=p.tier) for p in problems]
    scores = await asyncio.gather(*(one(t, i) for t in tasks for i in range(samples)))
    await engine.close()
    per_problem = {t.prompt_id: list(scores[j * samples : (j + 1) * samples]) for j, t in enumerate(tasks)}
    summary = summarize(per_problem, ks=tuple(sorted({1, samples})))
    log.info(
        "evaluated %d problems x %d samples in %.0fs: mean %.3f",
        len(tasks),
        samples,
        time.monotonic() - t0,
        summary["mean_score"],
    )
    return {
        "model": str(model),
        "dataset": str(dataset),
        "seed": cfg.rollout.seed,
        "summary": summary,
        "scores": per_problem,
        "seconds": round(time.monotonic() - t0, 1),
    }


def run_eval(
    cfg: EAPOConfig, model: Path | None, dataset: Path | None, layout: str, samples: int, out: Path, limit: int | None
) -> dict:
    report = asyncio.run(
        evaluate(
            cfg, model or cfg.world.dir / "policy", dataset or cfg.world.dir / "eval.jsonl", layout, samples, limit
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    cfg.dump_yaml(out.with_suffix(".config.yaml"))  # the config next to the result
    return report
