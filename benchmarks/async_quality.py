"""Does the speed cost learning? The default experiment's EAPO arm trained synchronously
(``learner.max_staleness: 0``) and asynchronously (1, 2, …), judged on the held-out split with the
policy alone at equal learner steps, over several seeds.

    python -m benchmarks.async_quality [--steps 40] [--seeds 0 1 2] [--modes 0 2]

Each run goes through ``eapo experiment``'s own harness (``run_arm``: ``eapo up``, then the held-out
judge), with ``configs/experiment.yaml``'s shared run config and only ``learner.steps`` shortened to fit
the machine. Finished runs under ``--out`` are reused, so an interrupted benchmark continues.

Target: every asynchronous mode's held-out mean score within one seed spread (the larger of the two
modes' standard deviations over seeds) of the synchronous one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.common import print_table, write_result
from eapo.core.config import ArmConfig, load_experiment, merge
from eapo.experiment.harness import run_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", type=Path, default=Path("configs/experiment.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--out", type=Path, default=None, help="default: runs/bench-async-quality-<steps>")
    args = ap.parse_args()
    args.out = args.out or Path(f"runs/bench-async-quality-{args.steps}")
    if 0 not in args.modes:
        raise SystemExit("--modes must include 0: the synchronous loop is the reference")
    exp = load_experiment(args.experiment)
    exp.out, exp.seeds, exp.eval_every = args.out, args.seeds, args.steps  # judged at step 0 and the last
    exp.run.setdefault("learner", {})["steps"] = args.steps
    eapo = exp.arms["eapo"].overrides
    exp.arms = {
        f"staleness-{m}": ArmConfig(overrides=merge(merge({}, eapo), {"learner": {"max_staleness": m}}))
        for m in args.modes
    }
    run_experiment(exp)

    rows, scores = [], {}
    for m in args.modes:
        finals = []
        for seed in args.seeds:
            result = json.loads((args.out / f"staleness-{m}" / f"seed-{seed}" / "result.json").read_text())
            finals.append(result["curve"][-1]["mean_score"])
        scores[m] = finals
        rows.append(
            {
                "max_staleness": m,
                **{f"seed {s}": v for s, v in zip(args.seeds, finals, strict=True)},
                "mean": statistics.fmean(finals),
                "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            }
        )
    print_table(rows, list(rows[0]))
    sync = next(r for r in rows if r["max_staleness"] == 0)
    others = [r for r in rows if r is not sync]
    targets = {}
    for row in others:
        spread = max(sync["std"], row["std"])
        targets[f"staleness {row['max_staleness']} within one seed spread ({spread:.4f}) of synchronous"] = (
            abs(row["mean"] - sync["mean"]) <= spread
        )
    summary = {f"delta_staleness_{r['max_staleness']}": r["mean"] - sync["mean"] for r in others}
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "run": exp.run}
    write_result("async_quality", config, {"scores": scores}, summary, targets)
    for name, ok in targets.items():
        print(f"{'MET ' if ok else 'MISS'} {name}")


if __name__ == "__main__":
    main()
