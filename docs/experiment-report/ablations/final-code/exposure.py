"""How many expert answers each ablation arm was shown, against where it ended (analysis script,
2026-12-05; not a product path).

Per run: the expert answers shown per training episode, averaged over the 400 steps (calls per episode
× accepted rate, from the step records), and the final held-out mean@4 alone minus the headline's
self-exploratory RL of the same seed (`docs/experiment-report/records/`). Prints a table and the
Pearson and Spearman correlations over arm means and over runs; writes `exposure.json` beside it.

    python3 docs/experiment-report/ablations/final-code/exposure.py
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import correlation, fmean

HERE = Path(__file__).parent
REFERENCE = HERE.parent.parent / "records" / "self-exploratory-rl"
TRAINED = [p.name for p in sorted((HERE / "records").iterdir()) if p.name != "self-collaboration"]


def final(record: dict) -> float:
    return record["curve"][-1]["mean_score"]


def shown_per_episode(record: dict) -> float:
    steps = record["metrics"]
    return fmean((m["calls_per_episode"] or 0.0) * (m["accepted_rate"] or 0.0) for m in steps)


def ranks(xs: list[float]) -> list[float]:
    """Ranks for Spearman's rho, ties sharing their mean rank."""
    return [fmean(i for i, y in enumerate(sorted(xs)) if y == x) for x in xs]


def main() -> None:
    runs = []
    for arm in TRAINED:
        for path in sorted((HERE / "records" / arm).glob("seed-*.json")):
            record = json.loads(path.read_text())
            reference = json.loads((REFERENCE / path.name).read_text())
            runs.append(
                {
                    "arm": arm,
                    "seed": record["seed"],
                    "shown": shown_per_episode(record),
                    "gap": final(record) - final(reference),
                }
            )
    arms = [
        {
            "arm": a,
            "shown": fmean(r["shown"] for r in runs if r["arm"] == a),
            "gap": fmean(r["gap"] for r in runs if r["arm"] == a),
        }
        for a in TRAINED
    ]
    arms.sort(key=lambda a: a["shown"])
    print("| arm | answers shown per episode | held-out alone − self-exploratory RL, seed mean |\n|---|---|---|")
    for a in arms:
        print(f"| {a['arm']} | {a['shown']:.3f} | {a['gap']:+.4f} |")
    fits = {}
    for name, rows in (("arm means", arms), ("runs", runs)):
        xs, ys = [r["shown"] for r in rows], [r["gap"] for r in rows]
        fits[name] = {"n": len(rows), "pearson": correlation(xs, ys), "spearman": correlation(ranks(xs), ranks(ys))}
        print(f"{name} (n={len(rows)}): Pearson {fits[name]['pearson']:+.3f}, Spearman {fits[name]['spearman']:+.3f}")
    (HERE / "exposure.json").write_text(json.dumps({"arms": arms, "runs": runs, "correlation": fits}, indent=1) + "\n")


if __name__ == "__main__":
    main()
