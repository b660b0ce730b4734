"""How many expert answers each ablation arm was shown, against where it ended (analysis script, not a
product path).

Per run: the expert answers shown per training episode, averaged over the 400 steps (calls per episode
× accepted rate, from the step records), calls per episode by phase, and the final held-out mean@4 alone
minus the self-exploratory RL run of the same seed in REFERENCE (records of the same config and code).
Prints a table per arm and the Pearson and Spearman correlations over arm means and over runs; writes
`exposure.json` into ABLATIONS.

    python3 docs/experiment-report/ablations/exposure.py [ABLATIONS [REFERENCE]]

defaults: `ablations/final-code` against the records of the headline of its code
(`docs/experiment-report/reruns/9676457/records`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import correlation, fmean

REPORTS = Path(__file__).parent.parent
PHASES = ((1, 25), (26, 50), (151, 250), (251, 300))  # training steps, both ends included


def final(record: dict) -> float:
    return record["curve"][-1]["mean_score"]


def shown_per_episode(record: dict) -> float:
    steps = record["metrics"]
    return fmean((m["calls_per_episode"] or 0.0) * (m["accepted_rate"] or 0.0) for m in steps)


def calls_by_phase(record: dict) -> list[float]:
    steps = record["metrics"]
    return [fmean(m["calls_per_episode"] or 0.0 for m in steps if lo <= m["step"] <= hi) for lo, hi in PHASES]


def ranks(xs: list[float]) -> list[float]:
    """Ranks for Spearman's rho, ties sharing their mean rank."""
    return [fmean(i for i, y in enumerate(sorted(xs)) if y == x) for x in xs]


def main(ablations: Path, reference: Path) -> None:
    trained = [p.name for p in sorted((ablations / "records").iterdir()) if p.name != "self-collaboration"]
    runs = []
    for arm in trained:
        for path in sorted((ablations / "records" / arm).glob("seed-*.json")):
            record = json.loads(path.read_text())
            alone_rl = json.loads((reference / "self-exploratory-rl" / path.name).read_text())
            runs.append(
                {
                    "arm": arm,
                    "seed": record["seed"],
                    "final": final(record),
                    "shown": shown_per_episode(record),
                    "calls": calls_by_phase(record),
                    "gap": final(record) - final(alone_rl),
                    "seconds": record["seconds"],
                }
            )
    arms = []
    for a in trained:
        mine = [r for r in runs if r["arm"] == a]
        arms.append(
            {
                "arm": a,
                "shown": fmean(r["shown"] for r in mine),
                "gap": fmean(r["gap"] for r in mine),
                "gaps": [r["gap"] for r in mine],
                "calls": [fmean(c) for c in zip(*(r["calls"] for r in mine), strict=True)],
                "seconds": [min(r["seconds"] for r in mine), max(r["seconds"] for r in mine)],
            }
        )
    arms.sort(key=lambda a: a["shown"])
    print(
        "| arm | answers shown per episode | calls per episode, steps "
        + " → ".join(f"{lo}–{hi}" for lo, hi in PHASES)
        + " | held-out alone − self-exploratory RL, per seed (mean) | seconds per seed |\n|---|---|---|---|---|"
    )
    for a in arms:
        calls = " → ".join(f"{c:.2f}" for c in a["calls"])
        gaps = ", ".join(f"{g:+.4f}" for g in a["gaps"])
        seconds = "–".join(f"{t:.0f}" for t in a["seconds"])
        print(f"| {a['arm']} | {a['shown']:.3f} | {calls} | {gaps} ({a['gap']:+.4f}) | {seconds} |")
    fits = {}
    for name, rows in (("arm means", arms), ("runs", runs)):
        xs, ys = [r["shown"] for r in rows], [r["gap"] for r in rows]
        fits[name] = {"n": len(rows), "pearson": correlation(xs, ys), "spearman": correlation(ranks(xs), ranks(ys))}
        print(f"{name} (n={len(rows)}): Pearson {fits[name]['pearson']:+.3f}, Spearman {fits[name]['spearman']:+.3f}")
    out = {"reference": str(reference.relative_to(REPORTS)), "arms": arms, "runs": runs, "correlation": fits}
    (ablations / "exposure.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    args = [Path(a).resolve() for a in sys.argv[1:]]
    main(
        args[0] if args else REPORTS / "ablations" / "final-code",
        args[1] if len(args) > 1 else REPORTS / "reruns" / "9676457" / "records",
    )
