"""``eapo experiment``: does EAPO beat self-exploratory RL here?

Every arm × seed runs with the real services (``eapo up`` for the arms that train), one after another
or ``jobs`` at once, and gets its own run directory under ``out/ARM/seed-S``. A trained arm's weight
versions are kept, and every ``eval_every``-th is judged on the held-out split, alone, N samples per
problem: the learning curve (its final point, which the report judges, with ``final_eval_samples``).
``result.json`` marks an arm × seed as finished and a rerun skips it, as it skips one with a record
(``out/records``, written by the report, perhaps on another machine); an interrupted one starts over
(its partial directory is moved aside). Every run names its world by digest, and an experiment whose
finished runs were made on another world is refused before anything runs. The report
(``eapo.experiment.report``) is then rebuilt from the run directories and records alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from multiprocessing import connection, get_context, parent_process
from multiprocessing.process import BaseProcess
from pathlib import Path

import yaml

from eapo.core.config import EAPOConfig, EvalMode, ExperimentConfig, KeepWeights
from eapo.core.data import read_jsonl
from eapo.core.logs import setup_logging
from eapo.core.tracking import Tracker
from eapo.dev.supervise import signal_on_parent_death
from eapo.dev.up import expert_pool, interrupt, run_stack
from eapo.dev.world.bootstrap import bootstrap, is_built, world_digest
from eapo.experiment.report import load_runs, record_path
from proto.weights import prune, version_dir
from rollout_service.evaluate import evaluate

log = logging.getLogger(__name__)
STOPPED = 130  # the exit code of a run stopped from outside (Ctrl-C, SIGTERM), as `eapo up`'s
RERUN_HINT = "rerun the same `eapo experiment` command: finished runs are kept, an unfinished one starts over"


def eval_steps(steps: int, every: int) -> list[int]:
    """The learner steps whose weights are judged: 0, every, 2·every, …, and always the last."""
    return sorted({*range(0, steps, every), steps})


def prune_judged(weights: Path, judged: list[int], keep: KeepWeights) -> None:
    """Once the curve is judged: keep the final version (``keep`` "final"), or every judged one ("judged")."""
    prune(weights, keep=1, in_use=set(judged) if keep == "judged" else set())


def per_tier(report: dict, tiers: dict[str, int]) -> dict[str, float]:
    scores: dict[int, list[float]] = defaultdict(list)
    for problem_id, values in report["scores"].items():
        scores[tiers[problem_id]] += values
    return {str(t): sum(v) / len(v) for t, v in sorted(scores.items())}


def judge(cfg: EAPOConfig, exp: ExperimentConfig, model: Path, mode: EvalMode, step: int, final: bool) -> dict:
    """One held-out evaluation, written to ``run_dir/eval/step-NNNNNN.json``; the final version's with
    ``final_eval_samples``."""
    dataset = cfg.world.dir / "eval.jsonl"
    samples = exp.final_samples if final else exp.eval_samples
    report = asyncio.run(evaluate(cfg, model, dataset, "world", samples, exp.eval_limit, mode))
    report["step"], report["samples"] = step, samples
    report["per_tier"] = per_tier(report, {p.id: p.tier for p in read_jsonl(dataset)})
    out = cfg.run_dir / "eval" / f"step-{step:06d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def track(cfg: EAPOConfig, evals: list[dict]) -> None:
    """Mirror the held-out curve to the configured tracking sinks (the eval JSON files are the record)."""
    tracker = Tracker(cfg, "eval")
    try:
        for e in evals:
            tracker.log({**e["summary"], "per_tier": e["per_tier"]}, e["step"])
    finally:
        tracker.close()


def run_arm(exp: ExperimentConfig, arm: str, seed: int) -> dict:
    """Train (if the arm trains) and judge one arm × seed; returns its ``result.json``."""
    spec, cfg = exp.arms[arm], exp.arm_config(arm, seed)
    result_path = cfg.run_dir / "result.json"
    for done in (result_path, record_path(exp.out, arm, seed)):
        if done.exists():
            log.info("%s seed %d: finished earlier (%s), skipped", arm, seed, done)
            return json.loads(done.read_text())
    if cfg.run_dir.exists():  # interrupted: keep what it left for inspection, start over
        aside = cfg.run_dir.with_name(f"{cfg.run_dir.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.run_dir.rename(aside)
        log.warning("%s seed %d: an interrupted attempt was moved to %s; starting over", arm, seed, aside)
    t0 = time.monotonic()
    if spec.train:
        cfg.learner.keep_versions = cfg.learner.steps + 1  # the learning curve judges old versions
        code = run_stack(cfg, resume_hint=RERUN_HINT)
        if code == STOPPED:  # stopped from outside (Ctrl-C, SIGTERM): the run did not fail
            raise KeyboardInterrupt(f"{arm} seed {seed}")
        if code != 0:
            raise RuntimeError(f"{arm} seed {seed}: training failed; see {cfg.run_dir}/logs")
        judged = eval_steps(cfg.learner.steps, exp.eval_every)
        evals = [
            judge(cfg, exp, version_dir(cfg.weights_dir, step), spec.eval_mode, step, final=step == judged[-1])
            for step in judged
        ]
        prune_judged(cfg.weights_dir, judged, exp.keep_weights)
    else:
        bootstrap(cfg.world)  # `eapo up` builds it for the arms that train
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.dump_yaml(cfg.run_dir / "config.yaml")
        model = cfg.world.dir / "policy"
        if spec.eval_mode == "alone":
            evals = [judge(cfg, exp, model, spec.eval_mode, 0, final=True)]
        else:
            with expert_pool(cfg) as served:
                evals = [judge(served, exp, model, spec.eval_mode, 0, final=True)]
    track(cfg, evals)
    result = {
        "arm": arm,
        "seed": seed,
        "world": world_digest(cfg.world.dir),  # its held-out split judged every arm, whatever the policy
        "train": spec.train,
        "eval_mode": spec.eval_mode,
        "steps": cfg.learner.steps if spec.train else 0,
        "curve": [
            {
                "step": e["step"],
                "samples": e["samples"],
                **{k: e["summary"][k] for k in ("mean_score", "variance", "pass@1")},
                "per_tier": e["per_tier"],
                "expert_calls_per_episode": e["expert_calls_per_episode"],
            }
            for e in evals
        ],
        "seconds": round(time.monotonic() - t0, 1),
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def check_world(exp: ExperimentConfig) -> None:
    """Build (or reuse) the world, once before any run needs it, or check the pinned one, and refuse to add
    runs on it to finished runs or records made on another world: they would be paired by seed."""
    world = exp.arm_config(next(iter(exp.arms)), exp.seeds[0]).world
    if exp.world_digest is None:
        here = world_digest(bootstrap(world))
    elif not is_built(world):
        # A rebuild would not give these bytes back: two machines built different worlds from one config,
        # so a pinned world is shipped and restored, never rebuilt.
        raise SystemExit(
            f"{world.dir.resolve()}: no world built from this experiment's world config (missing, or built from "
            f"another); its records were made on the shipped world {exp.world_digest}: run from the repository "
            f"root or restore it (git checkout -- {world.dir}), or point `run.world.dir` elsewhere and drop "
            "`world_digest` to start afresh"
        )
    elif (here := world_digest(world.dir)) != exp.world_digest:
        raise SystemExit(
            f"{world.dir.resolve()}: its files make world {here}, not the shipped {exp.world_digest} that this "
            f"experiment's records were made on; restore it (git checkout -- {world.dir}; git clean -n {world.dir} "
            "lists files that do not belong)"
        )
    there = {r.get("world"): f"{arm}/seed-{r['seed']}" for arm, rs in load_runs(exp.out).items() for r in rs}
    if there and here not in there:
        other, example = next(iter(there.items()))
        raise SystemExit(
            f"{exp.out}: its finished runs (e.g. {example}) were made on world {other}, this machine's is {here}; "
            "move them aside to start afresh, or continue where that world is built"
        )


def _run_announced(exp: ExperimentConfig, arm: str, seed: int, i: int, n: int, t0: float) -> dict:
    print(f"[eapo experiment] {i}/{n}: {arm}, seed {seed} ({time.monotonic() - t0:.0f}s so far)", flush=True)
    result = run_arm(exp, arm, seed)
    final = result["curve"][-1]
    print(
        f"[eapo experiment] {arm} seed {seed}: held-out mean score {final['mean_score']:.4f} "
        f"after {result['steps']} steps ({result['seconds']:.0f}s)",
        flush=True,
    )
    return result


def _worker(level: str, exp: ExperimentConfig, arm: str, seed: int, i: int, n: int, t0: float) -> None:
    # Stopped by the parent (SIGTERM, as `eapo up` stops on Ctrl-C), or by the kernel when the parent dies
    # unable to (SIGKILL): in the terminal's process group Ctrl-C would reach it too, and the parent's
    # SIGTERM then cut its services' orderly stop short.
    os.setpgrp()
    try:
        signal.signal(signal.SIGTERM, interrupt)
        if not signal_on_parent_death(signal.SIGTERM):
            log.warning("no parent-death signal here: if `eapo experiment` is SIGKILLed, this run goes on")
        parent = parent_process()
        if parent is None or os.getppid() != parent.pid:  # it died while this process was starting
            raise KeyboardInterrupt
        import torch

        # The in-process judgement on one thread: beside another run's multi-threaded torch processes two
        # threads oversubscribe the cores (`eapo eval` beside a 2-thread torch loop: 64-71 s, 31-35 s on one).
        torch.set_num_threads(1)
        setup_logging("experiment", level)
        _run_announced(exp, arm, seed, i, n, t0)
    except KeyboardInterrupt:
        sys.exit(STOPPED)  # the parent, which stopped it, says so


def _run_in_parallel(exp: ExperimentConfig, runs: list[tuple[str, int]], jobs: int, t0: float) -> None:
    """Up to ``jobs`` runs at once, a spawned process each, started in order. The first failure, Ctrl-C or
    SIGTERM ends the experiment: runs not started stay so, running ones are stopped (by the kernel if
    this process is SIGKILLed); finished runs keep their results, so a rerun continues from there."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    context = get_context("spawn")
    pending = list(enumerate(runs, 1))
    running: list[BaseProcess] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, (arm, seed) = pending.pop(0)
                # Listed before it starts: an interrupt between the two still finds it to stop.
                running.append(
                    context.Process(
                        target=_worker, args=(level, exp, arm, seed, i, len(runs), t0), name=f"{arm}/seed-{seed}"
                    )
                )
                running[-1].start()
            by_sentinel = {process.sentinel: process for process in running}
            for sentinel in connection.wait(list(by_sentinel)):
                process = by_sentinel[sentinel]
                running.remove(process)
                process.join()
                if process.exitcode in (STOPPED, -signal.SIGTERM, -signal.SIGINT):  # stopped from outside
                    raise KeyboardInterrupt(process.name)
                if process.exitcode != 0:
                    raise RuntimeError(f"{process.name} failed (exit code {process.exitcode}); see the error above")
    except BaseException:
        started = [process for process in running if process.pid is not None]
        for process in started:
            process.terminate()
        for process in started:
            process.join(timeout=120)
            if process.is_alive():
                process.kill()  # its services die with it (die_with_parent)
        raise


def run_experiment(exp: ExperimentConfig, arms: list[str] | None = None, jobs: int = 1) -> None:
    """Runs every arm × seed not finished yet, or only those of ``arms`` (an experiment too long for one
    sitting runs piecewise; the report covers whatever has finished). ``jobs`` > 1 runs that many arm ×
    seeds at once, each in its own process: one run leaves cores idle (its rollout samples on one thread
    while the experts wait), so two on two cores finish the whole sooner, each run slower than alone."""
    runs = exp.runs(arms)
    previous = signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it as Ctrl-C does, from the start
    try:
        check_world(exp)
        exp.out.mkdir(parents=True, exist_ok=True)
        (exp.out / "experiment.yaml").write_text(yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False))
        t0 = time.monotonic()
        if jobs == 1:
            for i, (arm, seed) in enumerate(runs, 1):
                _run_announced(exp, arm, seed, i, len(runs), t0)
        else:
            _run_in_parallel(exp, runs, jobs, t0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"[eapo experiment] all {len(runs)} runs done in {time.monotonic() - t0:.0f}s", flush=True)
