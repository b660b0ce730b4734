"""How much of a paired held-out gap is the evaluation's own sampling error.

    python docs/experiment-report/probes/sampling_error.py EVAL_A EVAL_B [STEP]

EVAL_A, EVAL_B: an arm's per-seed evaluations (``ARM/seed-S/eval/`` of a run directory or a probe's
``eval/ARM/seed-S/``; either ``ROOT`` holding ``seed-S/`` folders). For each seed both arms have at STEP
(default: the last), prints each arm's mean over every sample, the gap, and the gap's standard error from
the evaluation's sampling alone. Sample j of a problem is drawn with the same seed in both arms of a seed
(``rollout_service.episode.episode_seed``), so the error is taken from the paired differences: their
variance over samples within each problem (unbiased), averaged over problems, over samples × problems.
Then the gap again from only the first 4 samples per problem (the draws a 4-sample evaluation makes),
and the gaps' seed mean and std beside the std that sampling alone would give them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def table(root: Path, seed: int, step: int | None) -> np.ndarray | None:
    folder = root / f"seed-{seed}" / "eval" if (root / f"seed-{seed}" / "eval").is_dir() else root / f"seed-{seed}"
    files = sorted(folder.glob("step-*.json"))
    if not files:
        return None
    path = files[-1] if step is None else folder / f"step-{step:06d}.json"
    if not path.exists():
        return None
    scores = json.loads(path.read_text())["scores"]
    return np.array([scores[k] for k in sorted(scores)], dtype=float)


def paired_stderr(ta: np.ndarray, tb: np.ndarray) -> float:
    d = ta - tb
    return float(np.sqrt(d.var(axis=1, ddof=1).mean() / d.size))


def main(a: Path, b: Path, step: int | None) -> None:
    seeds = sorted(int(p.name.split("-")[1]) for p in a.glob("seed-*") if p.name.split("-")[1].isdigit())
    gaps, gaps4, errs = [], [], []
    print("| seed | samples | A | B | gap ± sampling se | gap, first 4 samples |")
    print("|---|---|---|---|---|---|")
    for s in seeds:
        ta, tb = table(a, s, step), table(b, s, step)
        if ta is None or tb is None:
            continue
        if ta.shape != tb.shape:
            raise SystemExit(f"seed {s}: {ta.shape} against {tb.shape} (problems × samples); judge both alike")
        gap, err = ta.mean() - tb.mean(), paired_stderr(ta, tb)
        gap4 = ta[:, :4].mean() - tb[:, :4].mean()
        gaps.append(gap)
        gaps4.append(gap4)
        errs.append(err)
        print(f"| {s} | {ta.shape[1]} | {ta.mean():.4f} | {tb.mean():.4f} | {gap:+.4f} ± {err:.4f} | {gap4:+.4f} |")
    if len(gaps) > 1:
        g, g4 = np.array(gaps), np.array(gaps4)
        print(
            f"\ngap {g.mean():+.4f}, seed std {g.std(ddof=1):.4f}, positive in {(g > 0).sum()} of {len(g)}; "
            f"sampling alone would give a std of {np.sqrt(np.mean(np.square(errs))):.4f}. "
            f"First 4 samples: {g4.mean():+.4f}, seed std {g4.std(ddof=1):.4f}, positive in {(g4 > 0).sum()}."
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
