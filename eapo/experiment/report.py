"""``eapo report DIR``: an experiment's report, rebuilt from its run directories and records alone.

Reads ``DIR/experiment.yaml``, every ``DIR/ARM/seed-S/{result.json,metrics.jsonl}`` and the records
``DIR/records/ARM/seed-S.json`` of runs whose directories are gone; writes ``report.md`` (the
Table-1-style comparison and the headline numbers), ``report.json`` (the same numbers, the headline's
targets judged), PNG plots (held-out score vs learner step and vs wall time, held-out variance, expert
call and accepted rates, response length and the paradigm mix over training) and a record of every run.

A record is the run's ``result.json`` with the learner metrics the report reads (~120 kB for 400 steps):
committed with the report, it lets an experiment longer than one machine's life continue elsewhere and the report
be rebuilt without the run directories. Runs pair by seed only on one world, so records from different
worlds (``world``: the built world's content digest) are refused.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import fmean, stdev

import matplotlib
import yaml

from eapo.core.config import final_sample_count
from eapo.core.files import write_atomic

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

PARADIGMS = ("self_resolution", "direct_consultation", "decomposition")
# Statistics of one mode (answering alone, consulting): absent from records made before they were kept.
OPTIONAL_METRICS = (
    "accuracy_alone",
    "accuracy_consulting",
    "advantage_alone",
    "advantage_consulting",
    "right_wrong_work_alone",
    "right_wrong_work_consulting",
    "right_no_work_alone",
    "right_no_work_consulting",
)
# What a record keeps of ``metrics.jsonl``: the learner metrics the report reads, and the per-mode ones.
RECORD_METRICS = (
    "step",
    "time_s",
    "acceptance",
    "calls_per_episode",
    "accepted_rate",
    "response_tokens",
    "accuracy",
    *(f"paradigm_{kind}" for kind in PARADIGMS),
    *OPTIONAL_METRICS,
)


def record_path(out: Path, arm: str, seed: int) -> Path:
    """Where the report keeps the record of ``arm`` × ``seed`` (and where ``eapo experiment`` looks for one)."""
    return out / "records" / arm / f"seed-{seed}.json"


def load_runs(out: Path) -> dict[str, list[dict]]:
    """Arm → its finished seeds' results, each with its learner metrics (``[]`` for arms that do not train):
    from the run directories, then from the records of runs that have none here. Runs of more than one
    world are refused: they would be paired by seed."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(out.glob("*/seed-*/result.json")):
        result = json.loads(path.read_text())
        metrics = path.parent / "metrics.jsonl"
        result["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        runs[result["arm"]].append(result)
    for path in sorted(out.glob("records/*/seed-*.json")):
        record = json.loads(path.read_text())
        if all(r["seed"] != record["seed"] for r in runs[record["arm"]]):
            runs[record["arm"]].append(record)
    worlds: dict[str | None, list[str]] = defaultdict(list)
    for arm, results in runs.items():
        for r in results:
            worlds[r.get("world")].append(f"{arm}/seed-{r['seed']}")
    if len(worlds) > 1:
        listing = "; ".join(
            f"{f'world {w}' if w else 'no world digest (a run from before digests: rerun it)'}: {', '.join(names)}"
            for w, names in worlds.items()
        )
        raise SystemExit(f"{out}: runs from different worlds cannot be paired by seed ({listing})")
    return runs


def write_records(runs: dict[str, list[dict]], out: Path) -> None:
    """A record of every run: its result and the metrics the report reads."""
    for arm, results in runs.items():
        for r in results:
            metrics = [{k: m[k] for k in RECORD_METRICS if k in m} for m in r["metrics"]]
            path = record_path(out, arm, r["seed"])
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**r, "metrics": metrics}, separators=(",", ":")) + "\n")


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": fmean(values),
        "std": stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step rollout statistics over a few groups are noisy); NaN entries
    (nothing to measure that step) are skipped, and a window of only NaN stays NaN."""
    return [nanmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return fmean(kept) if kept else math.nan


def step_value(metrics: dict, key: str) -> float:
    """A rollout statistic of one step, NaN where undefined: the accepted rate in a step without consults, a
    statistic of one mode (alone, consulting) in a step without it or in a record made before it was kept."""
    if key == "accepted_rate" and not metrics["calls_per_episode"]:
        return math.nan
    if key in OPTIONAL_METRICS and metrics.get(key) is None:
        return math.nan
    return metrics[key]


def summarize(runs: dict[str, list[dict]], compare: tuple[str, str], eval_samples: int) -> dict:
    """``eval_samples``: what a record from before curve points named their sample count was judged with."""
    arms = {}
    for arm, results in runs.items():
        finals = [r["curve"][-1] for r in results]
        tiers = sorted({t for f in finals for t in f["per_tier"]})
        arms[arm] = {
            "seeds": [r["seed"] for r in results],
            "train": results[0]["train"],
            "eval_mode": results[0]["eval_mode"],
            "steps": results[0]["steps"],
            "samples": sorted({f.get("samples", eval_samples) for f in finals}),  # mixed where records were copied in
            "mean_score": spread([f["mean_score"] for f in finals]),
            "variance": spread([f["variance"] for f in finals]),
            "per_tier": {t: fmean(f["per_tier"].get(t, 0.0) for f in finals) for t in tiers},
            "eval_calls_per_episode": fmean(f["expert_calls_per_episode"] for f in finals),
            "seconds": spread([r["seconds"] for r in results]),
        }
        if results[0]["metrics"]:
            k = max(1, results[0]["steps"] // 5)
            first = [fmean(m["calls_per_episode"] for m in r["metrics"][:k]) for r in results]
            last = [fmean(m["calls_per_episode"] for m in r["metrics"][-k:]) for r in results]
            arms[arm]["train_calls_per_episode"] = {"first_fifth": fmean(first), "last_fifth": fmean(last)}
        if len(results[0]["curve"]) > 1:
            arms[arm]["lowest"] = lowest(results)
    a, b = compare
    headline = None
    if a in runs and b in runs:
        gap = paired(runs[a], runs[b], "mean_score")
        if gap:
            headline = {
                "arms": [a, b],
                "gap": gap,
                "variance_gap": paired(runs[a], runs[b], "variance"),
                "calls_fell": (
                    arms[a]["train_calls_per_episode"]["last_fifth"] < arms[a]["train_calls_per_episode"]["first_fifth"]
                    if "train_calls_per_episode" in arms[a]
                    else None
                ),
            }
            headline["calls_phases"] = call_phases(runs[a]) if runs[a][0]["metrics"] else None
            headline["targets"] = judge_targets(headline)
    against = {arm: paired(runs[a], results, "mean_score") for arm, results in runs.items() if a in runs and arm != a}
    return {"arms": arms, "headline": headline, "against": {arm: g for arm, g in against.items() if g}}


def paired(a: list[dict], b: list[dict], key: str) -> dict[str, float] | None:
    """Final held-out ``key`` of ``a`` minus ``b``'s, paired by seed; None without a seed in common."""
    by_seed = {r["seed"]: r["curve"][-1][key] for r in b}
    gaps = [r["curve"][-1][key] - by_seed[r["seed"]] for r in a if r["seed"] in by_seed]
    return spread(gaps) if gaps else None


def lowest(results: list[dict]) -> dict[str, float]:
    """The lowest point of the seed-mean held-out curve and how far it lies below the start: the dip a policy
    that trains under expert help shows when what it learns does not carry over to answering alone."""
    n = min(len(r["curve"]) for r in results)  # the points every seed has
    curve = [(results[0]["curve"][i]["step"], fmean(r["curve"][i]["mean_score"] for r in results)) for i in range(n)]
    step, score = min(curve, key=lambda point: point[1])
    return {"step": step, "mean_score": score, "below_start": curve[0][1] - score}


def call_phases(results: list[dict]) -> dict[str, float | bool | None]:
    """The paper's two phases of the call rate, on the seed-mean curve: it holds (or rises) while p(t) is
    still high, and falls by the end. "Early" is the first fifth of training; "late high-p" the last fifth
    of the steps trained at p ≥ 0.5 (no collapse there means ≥ half the early rate); "end" the last fifth.
    An arm never trained at p ≥ 0.5 (a low fixed rate) has no high-p phase: None, nothing to judge."""
    n = min(len(r["metrics"]) for r in results)
    calls = [fmean(r["metrics"][i]["calls_per_episode"] for r in results) for i in range(n)]
    high_p = [i for i in range(n) if results[0]["metrics"][i]["acceptance"] >= 0.5]
    k = max(1, n // 5)
    early, end = fmean(calls[:k]), fmean(calls[-k:])
    late_high = fmean(calls[i] for i in high_p[-max(1, len(high_p) // 5) :]) if high_p else None
    return {
        "early": early,
        "late_high_p": late_high,
        "end": end,
        "holds_while_p_high": bool(late_high >= 0.5 * early) if late_high is not None else None,
        "falls": end < early,
    }


def judge_targets(headline: dict) -> dict[str, bool | None]:
    """Issue #18's targets as they stand: the paired gap positive for every seed and its mean larger than the
    seed std; variance no higher; the call rate's two phases. None where there is nothing to judge."""
    gap, phases = headline["gap"], headline["calls_phases"]
    return {
        "gap_positive_every_seed": gap["min"] > 0,
        "gap_mean_exceeds_seed_std": gap["mean"] > gap["std"] if gap["n"] > 1 else None,
        "variance_not_higher": headline["variance_gap"]["mean"] <= 0,
        "calls_hold_then_fall": (phases["holds_while_p_high"] and phases["falls"]) if phases else None,
    }


def _step_time(result: dict, step: int) -> float:
    """Wall time (s) of the learner when it finished ``step`` (0 before the first step)."""
    times = {m["step"]: m["time_s"] for m in result["metrics"]}
    return times.get(step, 0.0)


def plot_curves(runs: dict[str, list[dict]], out: Path) -> list[str]:
    """Held-out curves: mean score vs learner step and vs wall time, per-problem variance vs step."""
    return [
        _plot_heldout(runs, out, "mean_score", "held-out mean score, alone", "step"),
        _plot_heldout(runs, out, "mean_score", "held-out mean score, alone", "time"),
        _plot_heldout(runs, out, "variance", "held-out per-problem variance, alone", "step"),
    ]


def _plot_heldout(runs: dict[str, list[dict]], out: Path, key: str, y_label: str, x_name: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (arm, results) in enumerate(runs.items()):
        color = f"C{k}"  # one colour per arm, the same in every plot
        values = [fmean(r["curve"][i][key] for r in results) for i in range(len(results[0]["curve"]))]
        if not results[0]["train"]:
            ax.axhline(values[-1], color=color, linestyle="--", linewidth=1, label=f"{arm} (no training)")
            continue
        steps = [c["step"] for c in results[0]["curve"]]
        xs = steps if x_name == "step" else [fmean(_step_time(r, s) for r in results) for s in steps]
        low = [min(r["curve"][i][key] for r in results) for i in range(len(steps))]
        high = [max(r["curve"][i][key] for r in results) for i in range(len(steps))]
        ax.plot(xs, values, color=color, marker="o", label=f"{arm} (mean of {len(results)} seeds, band: min–max)")
        ax.fill_between(xs, low, high, alpha=0.15, color=color)
    ax.set_xlabel("learner step" if x_name == "step" else "learner wall time (s)")
    ax.set_ylabel(y_label)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    name = f"heldout_{'' if key == 'mean_score' else key + '_'}vs_{x_name}.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_training(runs: dict[str, list[dict]], out: Path) -> list[str]:
    """Rollout statistics over training (mean over seeds, trailing moving average)."""
    trained = {arm: results for arm, results in runs.items() if results[0]["metrics"]}
    if not trained:
        return []
    panels = [
        ("calls_per_episode", "expert calls per episode"),
        ("accepted_rate", "accepted rate of consults (steps with consults)"),
        ("response_tokens", "policy tokens per episode"),
        ("accuracy", "training reward: accuracy"),
        ("accuracy_alone", "training accuracy of episodes answered alone"),
        ("advantage_alone", "mean advantage of trained samples answered alone"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for arm, results in trained.items():
            n = min(len(r["metrics"]) for r in results)
            color = f"C{list(runs).index(arm)}"
            per_seed = [[step_value(r["metrics"][i], key) for r in results] for i in range(n)]
            values = [nanmean(vs) for vs in per_seed]
            ax.plot(range(1, n + 1), smooth(values, max(1, n // 10)), color=color, label=arm)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("learner step", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(trained), figsize=(4.5 * len(trained), 3.6), squeeze=False)
    for ax, (arm, results) in zip(axes[0], trained.items(), strict=True):
        n = min(len(r["metrics"]) for r in results)
        for kind in PARADIGMS:
            values = [fmean(r["metrics"][i][f"paradigm_{kind}"] for r in results) for i in range(n)]
            ax.plot(range(1, n + 1), smooth(values, max(1, n // 10)), label=kind.replace("_", " "))
        ax.set_title(f"paradigm mix: {arm}", fontsize=9)
        ax.set_xlabel("learner step", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "paradigms.png", dpi=110)
    plt.close(fig)
    return ["training.png", "paradigms.png"]


def _pm(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def table(summary: dict) -> str:
    arms = summary["arms"]
    tiers = sorted({t for a in arms.values() for t in a["per_tier"]})
    head = (
        "| arm | judged | steps | samples per problem | final mean score (± seed std [min, max]) | variance | "
        + " | ".join(f"tier {t}" for t in tiers)
        + " | calls/ep (eval) | lowest on the curve (step) |"
    )
    lines = [head, "|" + "---|" * (8 + len(tiers))]
    for arm, a in arms.items():
        low = f"{a['lowest']['mean_score']:.4f} ({a['lowest']['step']})" if "lowest" in a else "—"
        lines.append(
            f"| {arm} | {a['eval_mode']} | {a['steps']} | {', '.join(map(str, a['samples']))} | "
            f"{_pm(a['mean_score'])} | {a['variance']['mean']:.4f} | "
            + " | ".join(f"{a['per_tier'].get(t, 0.0):.3f}" for t in tiers)
            + f" | {a['eval_calls_per_episode']:.2f} | {low} |"
        )
    return "\n".join(lines)


def against_table(summary: dict, arm: str) -> str:
    """``arm`` minus every other arm, paired by seed: what each ablation changes."""
    lines = [f"| {arm} − … | paired gap, mean ± seed std [min, max] | seeds |", "|---|---|---|"]
    lines += [
        f"| {other} | {g['mean']:+.4f} ± {g['std']:.4f} [{g['min']:+.4f}, {g['max']:+.4f}] | {g['n']} |"
        for other, g in summary["against"].items()
    ]
    return "\n".join(lines)


def headline_text(summary: dict) -> str:
    h = summary["headline"]
    if h is None:
        return "The compared arms have no seeds in common yet: no headline."
    a, b = h["arms"]
    gap, var_gap = h["gap"], h["variance_gap"]
    calls = summary["arms"][a].get("train_calls_per_episode")
    lines = [
        f"- **{a} − {b}**, held-out mean score alone, paired by seed ({gap['n']} seeds): "
        f"**{gap['mean']:+.4f}** (seed std {gap['std']:.4f}, range [{gap['min']:+.4f}, {gap['max']:+.4f}]).",
        f"- Variance ({a} − {b}): {var_gap['mean']:+.4f} (range [{var_gap['min']:+.4f}, {var_gap['max']:+.4f}]); "
        f"lower for {a}: {'yes' if var_gap['mean'] < 0 else 'no'}.",
    ]
    phases = h.get("calls_phases")
    if phases:
        late, holds = phases["late_high_p"], phases["holds_while_p_high"]
        lines.append(
            f"- Call-rate phases (seed mean): {phases['early']:.2f} early, "
            + (f"{late:.2f} in the last steps at p ≥ 0.5" if late is not None else "no step at p ≥ 0.5")
            + f", {phases['end']:.2f} at the end; holds while p is high: "
            + ("yes" if holds else "no" if holds is False else "n/a")
            + f", falls: {'yes' if phases['falls'] else 'no'}."
        )
    if h.get("targets"):
        lines.append(
            "- Targets: "
            + ", ".join(f"{k} {'met' if v else 'NOT met' if v is False else 'n/a'}" for k, v in h["targets"].items())
            + "."
        )
    if calls is not None:
        lines.append(
            f"- {a}'s expert calls per training episode: {calls['first_fifth']:.2f} in the first fifth of training, "
            f"{calls['last_fifth']:.2f} in the last; fell: {'yes' if h['calls_fell'] else 'no'}."
        )
    return "\n".join(lines)


def write_report(out: Path) -> dict:
    exp = yaml.safe_load((out / "experiment.yaml").read_text())
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"{out}: no finished runs (ARM/seed-S/result.json or records/ARM/seed-S.json)")
    order = [arm for arm in exp["arms"] if arm in runs]
    runs = {arm: sorted(runs[arm], key=lambda r: r["seed"]) for arm in order}
    final = final_sample_count(exp["eval_samples"], exp.get("final_eval_samples"))
    summary = {
        "eval_samples": exp["eval_samples"],
        "final_eval_samples": final,
        **summarize(runs, tuple(exp["compare"]), exp["eval_samples"]),
    }
    images = plot_curves(runs, out) + plot_training(runs, out)
    write_records(runs, out)
    missing = [
        f"{arm}/seed-{s}"
        for arm in exp["arms"]
        for s in exp["seeds"]
        if s not in summary["arms"].get(arm, {}).get("seeds", [])
    ]
    first = exp["compare"][0]
    caption = f"Final held-out mean score (each arm judged as in the table), {first} minus each arm, paired by seed:"
    against_md = [caption, "", against_table(summary, first), ""] if summary["against"] else []
    md = [
        "# EAPO experiment report",
        "",
        f"Regenerate with `eapo report {out}`. Held-out split: `eval.jsonl` of the world; every policy is "
        f"judged alone (minimal prompt, no consult action) unless the arm says otherwise, "
        f"{exp['eval_samples']} samples per problem along the curve and {final} for the final version "
        "(the table's column says what each arm's records hold).",
        "",
        "## Result",
        "",
        headline_text(summary),
        "",
        table(summary),
        "",
        *against_md,
        *(f"![{name}]({name})\n" for name in images),
    ]
    if missing:
        md += ["", f"Not finished (excluded above): {', '.join(missing)}."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
