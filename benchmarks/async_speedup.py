"""Asynchrony against a synchronous loop: the same ``eapo up`` run with ``learner.max_staleness`` 0 (the
feed admits a step's prompts only after the previous step: synchronous), 1, 2 and 4.

    python -m benchmarks.async_speedup [--config configs/tiny.yaml] [--steps 30] [--modes 0 1 2 4]
                                       [--seeds 0 1 2]

Every run is the README's run (real processes, private Redis, the tiny world) with the rollout pinned
to one core, the learner to the other and the experts and gateway sharing both
(``supervision.cpu_affinity``): the laptop-sized picture of rollout and learner on their own hardware.
The modes share each seed and the step count, and the speed-up is paired by seed: repeats of one run
differ by up to ~25%, since which version samples which turn depends on timing, and with it how many
groups are dropped. Each run records its timeline (``timeline: true``); the first ``--warmup`` steps
are left out of every figure, and each figure is the mean over seeds. Per mode: learner steps per
hour; the learner's idle ratio (waiting for groups) and the rollout's (no group in flight: nothing
admitted, i.e. back-pressure), with the share of its group slots in use; the version lag of the
trained tokens; the importance-weight statistics; and the delay from a version's publication to the
rollout serving it. The timeline picture (first seed) of the synchronous and the fastest asynchronous
mode is written beside the JSON.

Targets: the best ``max_staleness`` ≤ 2 runs ≥ 1.7× the synchronous learner steps per hour, its learner
idle ratio < 10%, and weight sync p50 ≤ 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import RESULTS, print_table, write_result
from eapo.core.timeline import read_timeline


def affinity() -> dict[str, list[int]]:
    """Rollout and learner on a core each (the first two this process may use), experts and gateway on both."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise SystemExit("this benchmark pins rollout and learner to a core each: it needs 2 cores")
    return {"rollout": cores[:1], "learner": cores[1:], "expert": cores, "gateway": cores}


def run_mode(config: Path, out: Path, staleness: int, steps: int, seed: int) -> Path:
    """One ``eapo up`` run; returns its run directory. A finished run of the same config, staleness, seed
    and step count is reused; an unfinished one is started over."""
    run_dir = out / f"{config.stem}-staleness{staleness}-seed{seed}-steps{steps}"
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["ok"]:
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {
        **os.environ,
        "EAPO_RUN_DIR": str(run_dir),
        "EAPO_SEED": str(seed),
        "EAPO_LEARNER__STEPS": str(steps),
        "EAPO_LEARNER__MAX_STALENESS": str(staleness),
        "EAPO_TIMELINE": "true",
        "EAPO_SUPERVISION__CPU_AFFINITY": json.dumps(affinity()),
        "EAPO_SUPERVISION__MAX_RESTARTS": "0",  # a crash is a failed measurement, not something to hide
    }
    print(f"max_staleness={staleness} seed={seed}: eapo up → {run_dir}", flush=True)
    eapo = Path(sys.executable).with_name("eapo")
    done = subprocess.run([str(eapo), "up", "--config", str(config)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eapo up failed (rc {done.returncode}) for max_staleness={staleness}:\n{done.stdout[-3000:]}")
    return run_dir


def busy_fraction(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """The share of [lo, hi] covered by the union of ``spans``."""
    covered, end = 0.0, lo
    for t0, t1 in sorted(spans):
        t0, t1 = max(t0, end), min(t1, hi)
        if t1 > t0:
            covered += t1 - t0
            end = t1
    return covered / max(hi - lo, 1e-9)


def mean_overlap(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """How many of ``spans`` are open at once, on average over [lo, hi]."""
    return sum(max(0.0, min(t1, hi) - max(t0, lo)) for t0, t1 in spans) / max(hi - lo, 1e-9)


def serving_delays(published: dict[int, float], loaded: list[tuple[int, float]], versions: range) -> list[float]:
    """Per version: publication to the first moment a replica serves it or a newer one (a skipped version
    counts until its successor serves). The load span's end is that moment: the engine's next batch,
    milliseconds later, samples with it."""
    return [
        min(t for v, t in loaded if v >= version) - published[version]
        for version in versions
        if any(v >= version for v, _ in loaded)
    ]


def load_run(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """A run's metrics records, learner timeline and the timelines of all its rollout replicas."""
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learner = read_timeline(run_dir / "timeline" / "learner.jsonl")
    rollout = [r for p in sorted((run_dir / "timeline").glob("rollout-*.jsonl")) for r in read_timeline(p)]
    return steps, learner, rollout


def measure(run_dir: Path, warmup: int) -> dict[str, float]:
    """The figures of one run over the steps after ``warmup``: from the publication that ends step
    ``warmup`` to the one that ends the last step. Token statistics are weighted by policy tokens;
    the capped share is that of ``learner.importance: decoupled`` (tokens above the cap leave the loss)."""
    steps, learner, rollout = load_run(run_dir)
    in_flight = yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["max_groups_in_flight"]
    published = {r["version"]: r["t"] for r in learner if r["what"] == "published"}
    lo, hi = published[warmup], published[len(steps)]
    window = [s for s in steps if s["step"] > warmup]
    tokens = sum(s["policy_tokens"] for s in window)
    masked = sum(s["is_masked_tokens"] for s in window)

    def by_tokens(key: str) -> float:  # a per-step mean, weighted by the step's policy tokens
        return sum(s[key] * s["policy_tokens"] for s in window) / tokens

    loaded = [(r["version"], r["t1"]) for r in rollout if r["what"] == "load_weights"]
    delays = serving_delays(published, loaded, range(warmup + 1, len(steps)))
    groups = [(r["t0"], r["t1"]) for r in rollout if r["what"] == "group"]
    return {
        "steps_per_hour": len(window) / (hi - lo) * 3600,
        "learner_idle": sum(s["wait_s"] for s in window) / (hi - lo),
        "rollout_idle": 1 - busy_fraction(groups, lo, hi),
        "rollout_slots_used": mean_overlap(groups, lo, hi) / in_flight,
        "token_lag_mean": by_tokens("token_lag_mean"),
        "token_lag_max": max(s["token_lag_max"] for s in window),
        "is_weight_mean": by_tokens("is_weight_mean"),
        "is_weight_max": max(s["is_weight_max"] for s in window),
        "is_capped_share": masked / max(tokens + masked, 1),
        "sync_p50_s": statistics.median(delays),
        "sync_max_s": max(delays),
        "groups_read_per_step": statistics.fmean(s["groups_read"] for s in window),
        "window_s": hi - lo,
    }


def draw(runs: dict[str, Path], warmup: int, seconds: float, path: Path) -> None:
    """Who is busy when, for ``seconds`` after the warm-up: learner spans, and each group in flight on
    its own lane under the rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.6 * len(runs)), squeeze=False)
    colors = {"wait": "#dddddd", "train": "#d62728", "checkpoint": "#ff7f0e", "publish": "#2ca02c"}
    for ax, (label, run_dir) in zip(axes[:, 0], runs.items(), strict=True):
        _, learner, rollout = load_run(run_dir)
        t0 = next(r["t"] for r in learner if r["what"] == "published" and r["version"] == warmup)
        lanes: list[float] = []  # when each lane is free again
        for r in sorted((r for r in rollout if r["what"] == "group"), key=lambda r: r["t0"]):
            lane = next((i for i, free in enumerate(lanes) if free <= r["t0"]), len(lanes))
            if lane == len(lanes):
                lanes.append(r["t1"])
            else:
                lanes[lane] = r["t1"]
            ax.broken_barh([(r["t0"] - t0, r["t1"] - r["t0"])], (lane + 1.6, 0.8), color="#1f77b4")
        for r in learner:
            if "t0" in r:
                ax.broken_barh([(r["t0"] - t0, r["t1"] - r["t0"])], (0, 1), color=colors[r["what"]])
        for r in rollout:
            if r["what"] == "load_weights":
                ax.broken_barh([(r["t0"] - t0, r["t1"] - r["t0"])], (1.1, 0.4), color="#9467bd")
        ax.set_xlim(0, seconds)
        ax.set_yticks([0.5, 1.3, 2.0 + len(lanes) / 2])
        ax.set_yticklabels(["learner", "load", "rollout groups"])
        ax.set_title(label, fontsize=10)
    axes[-1, 0].set_xlabel(
        "seconds after the warm-up (learner: grey waits, red trains, orange checkpoints, green publishes)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-async"))
    args = ap.parse_args()
    if 0 not in args.modes or not any(m > 0 for m in args.modes):
        raise SystemExit("--modes needs 0 (the synchronous reference) and at least one asynchronous mode")
    t0 = time.monotonic()
    runs = {(m, s): run_mode(args.config, args.out, m, args.steps, s) for s in args.seeds for m in args.modes}
    per_run = [{"max_staleness": m, "seed": s, **measure(d, args.warmup)} for (m, s), d in runs.items()]
    figures = [k for k in per_run[0] if k not in ("max_staleness", "seed", "window_s")]
    rows = [
        {"max_staleness": m, **{k: statistics.fmean(r[k] for r in per_run if r["max_staleness"] == m) for k in figures}}
        for m in args.modes
    ]  # each figure the mean over seeds
    print_table(rows, ["max_staleness", *figures])
    candidates = [r for r in rows if 0 < r["max_staleness"] <= 2] or [r for r in rows if r["max_staleness"] > 0]
    best = max(candidates, key=lambda r: r["steps_per_hour"])
    rate = {(r["max_staleness"], r["seed"]): r["steps_per_hour"] for r in per_run}
    speedups = [rate[best["max_staleness"], s] / rate[0, s] for s in args.seeds]  # paired by seed
    speedup = statistics.fmean(speedups)
    spread = statistics.stdev(speedups) if len(speedups) > 1 else 0.0
    print(
        f"\nbest asynchronous mode: max_staleness={best['max_staleness']}, {speedup:.2f}x ± {spread:.2f} "
        f"the synchronous loop (per seed: {', '.join(f'{x:.2f}' for x in speedups)})"
    )
    picture = RESULTS / "async_speedup.png"
    shown = {
        "synchronous (max_staleness=0)": runs[0, args.seeds[0]],
        f"max_staleness={best['max_staleness']}": runs[best["max_staleness"], args.seeds[0]],
    }
    draw(shown, args.warmup, 60.0, picture)
    summary = {
        "best_max_staleness": best["max_staleness"],
        "speedup": speedup,
        "speedup_per_seed": speedups,
        "speedup_std": spread,
        "learner_idle_async": best["learner_idle"],
        "sync_p50_s_async": best["sync_p50_s"],
        "timeline_picture": str(picture.relative_to(RESULTS.parent.parent)),
        "wall_s": time.monotonic() - t0,
    }
    targets = {
        "speedup >= 1.7": speedup >= 1.7,
        "async learner idle < 10%": best["learner_idle"] < 0.10,
        "weight sync p50 <= 0.5 s": best["sync_p50_s"] <= 0.5,
    }
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "affinity": affinity()}
    write_result("async_speedup", config, {"modes": rows, "runs": per_run}, summary, targets)
    for name, ok in targets.items():
        print(f"{'MET ' if ok else 'MISS'} {name}")


if __name__ == "__main__":
    main()
