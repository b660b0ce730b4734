"""The annealing scheduler: p(t), B(t), λ(t) as pure functions of the learner step.

Each quantity holds its start value for ``hold`` steps, then moves to ``end`` over ``steps`` steps
along its family's curve, and stays there. The rollout never computes these: it reads the
AnnealState the learner publishes.
"""

from __future__ import annotations

import math

from eapo.core.config import AnnealConfig, ScheduleConfig
from proto import AnnealState


def progress(cfg: ScheduleConfig, step: int) -> float:
    """Fraction of the way from start to end at ``step``, in [0, 1]."""
    if cfg.kind == "constant":
        return 0.0
    t = min(max(step - cfg.hold, 0) / max(cfg.steps, 1), 1.0)
    if cfg.kind == "linear":
        return t
    if cfg.kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    if cfg.kind == "exponential":  # fast early decay: 1 - e^{-5t}, renormalized to reach 1 at t=1
        return (1.0 - math.exp(-5.0 * t)) / (1.0 - math.exp(-5.0))
    if cfg.kind == "step":  # piecewise constant, moving every ``step_every`` steps
        every = max(cfg.step_every, 1)
        return min(math.floor(max(step - cfg.hold, 0) / every) * every / max(cfg.steps, 1), 1.0)
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")


def value(cfg: ScheduleConfig, step: int) -> float:
    return cfg.start + (cfg.end - cfg.start) * progress(cfg, step)


def anneal_state(cfg: AnnealConfig, step: int) -> AnnealState:
    return AnnealState(
        step=step,
        acceptance=min(max(value(cfg.acceptance, step), 0.0), 1.0),
        budget=max(1, round(value(cfg.budget, step))),
        penalty=max(value(cfg.penalty, step), 0.0),
    )
