"""Evaluation metrics as the paper defines them, per problem over N sampled scores, then averaged.

- mean@N ("Pass@N" in the paper): the mean of the N sample scores of a problem;
- variance: the population variance of those N scores;
- pass@k: the unbiased estimator 1 − C(n−c, k)/C(n, k) (Chen et al., 2021), c = correct samples.
"""

from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(scores: dict[str, list[float]], ks: tuple[int, ...] = (1,)) -> dict[str, float]:
    """``scores``: problem id → its N sample scores (0/1 or partial credit)."""
    if not scores:
        raise ValueError("no problems to summarize")
    sizes = {len(v) for v in scores.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every problem needs the same non-zero number of samples, got {sorted(sizes)}")
    table = np.array(list(scores.values()), dtype=float)
    n = table.shape[1]
    out = {
        "problems": float(len(table)),
        "samples_per_problem": float(n),
        "mean_score": float(table.mean(axis=1).mean()),
        "variance": float(table.var(axis=1).mean()),
    }
    correct = (table >= 1.0).sum(axis=1)
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    return out
