"""What a learner step records: one flat record per step in ``metrics.jsonl`` (the source of truth), mirrored
to the configured trackers and the Prometheus gauges.

The rollout statistics cover every group the step read, dropped ones included, so the record shows what
the rollouts looked like, not only what survived the filters.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import fmean

from eapo.core.config import EAPOConfig, LearnerConfig
from eapo.core.metrics import StepGauges
from eapo.core.tracking import Tracker
from learner.loss import outcome_rewards
from proto import AnnealState, TrajectoryGroup
from proto import episode_format as fmt


@dataclass(frozen=True)
class StepTimes:
    """Seconds since the run started, spent waiting for groups this step, and in the whole step."""

    run_s: float
    wait_s: float
    step_s: float


def calls_per_episode(groups: list[TrajectoryGroup]) -> float:
    samples = [s for g in groups for s in g.samples]
    return sum(len(s.consults) for s in samples) / max(len(samples), 1)


def token_lags(groups: list[TrajectoryGroup], learner_version: int) -> dict[str, float]:
    """How many versions behind the learner the sampled tokens of ``groups`` are, token-weighted."""
    turns = [(learner_version - t.policy_version, t.end - t.start) for g in groups for s in g.samples for t in s.turns]
    tokens = sum(n for _, n in turns)
    return {
        "token_lag_mean": sum(lag * n for lag, n in turns) / max(tokens, 1),
        "token_lag_max": float(max((lag for lag, n in turns if n), default=0)),
    }


def rollout_stats(groups: list[TrajectoryGroup], learner_version: int) -> dict[str, float]:
    """What the rollouts of this step looked like, over every group read (kept or dropped)."""
    samples = [s for g in groups for s in g.samples]
    consults = [c for s in samples for c in s.consults]
    asked = [c for c in consults if c.outcome != "not_asked"]
    n = max(len(samples), 1)
    versions = [t.policy_version for s in samples for t in s.turns] or [0]
    kinds = Counter(fmt.paradigm([c.query for c in s.consults], g.prompt.problem) for g in groups for s in g.samples)
    lags = [learner_version - g.min_policy_version for g in groups] or [0]
    f1s = [s.f1 for s in samples if s.f1 is not None]  # short-answer tasks only
    alone = [s.score for s in samples if not s.consults]
    consulting = [s.score for s in samples if s.consults]
    # of the right answers, by whether they consulted: those below written work that does not hold (a copied
    # box, say), and those that write none (learner.check_work credits these, so it may teach leaving work out)
    right = {
        mode: [s.work_holds for s in samples if s.score == 1 and bool(s.consults) == consulted]
        for mode, consulted in (("alone", False), ("consulting", True))
    }
    return {
        "groups_read": len(groups),
        "accuracy": sum(s.score for s in samples) / n,
        **({"f1": sum(f1s) / len(f1s)} if f1s else {}),
        "calls_per_episode": calls_per_episode(groups),
        "consulting_episodes": sum(bool(s.consults) for s in samples) / n,
        "accuracy_alone": fmean(alone) if alone else None,
        "accuracy_consulting": fmean(consulting) if consulting else None,
        **{f"right_wrong_work_{mode}": fmean(w is False for w in ws) if ws else None for mode, ws in right.items()},
        **{f"right_no_work_{mode}": fmean(w is None for w in ws) if ws else None for mode, ws in right.items()},
        "accepted_rate": sum(c.accepted for c in consults) / max(len(consults), 1),
        "answered_rate": sum(c.outcome == "answer" for c in asked) / len(asked) if asked else None,
        "response_tokens": sum(s.policy_tokens for s in samples) / n,
        "version_lag_mean": sum(lags) / len(lags),
        "version_lag_max": float(max(lags)),
        **{f"paradigm_{k}": kinds[k] / n for k in ("self_resolution", "direct_consultation", "decomposition")},
        "policy_version_min": min(versions),
        "policy_version_max": max(versions),
    }


def advantage_by_mode(groups: list[TrajectoryGroup], advantages: list[list[float]]) -> dict[str, float | None]:
    """The mean advantage (``advantages[i]``: the samples' of ``groups[i]``, as trained) of the samples that
    answered alone and of those that consulted. Each
    group's advantages sum to zero, so when the two modes share groups a negative mean for answering alone
    says the outcome signal pushes answering alone down and consulting up (the positives of its groups came
    from consulting), whatever the consult decision itself is worth."""
    pairs = [
        (bool(s.consults), a)
        for g, adv in zip(groups, advantages, strict=True)
        for s, a in zip(g.samples, adv, strict=True)
    ]
    alone = [a for consulted, a in pairs if not consulted]
    consulting = [a for consulted, a in pairs if consulted]
    return {
        "advantage_alone": fmean(alone) if alone else None,
        "advantage_consulting": fmean(consulting) if consulting else None,
    }


def step_timing(times: StepTimes, policy_tokens: float) -> dict[str, float]:
    """The record's time fields: ``step_s`` is the step's own time past waiting for groups."""
    compute_s = times.step_s - times.wait_s
    return {
        "time_s": round(times.run_s, 2),
        "wait_s": round(times.wait_s, 3),
        "step_s": round(compute_s, 3),
        "idle_ratio": round(times.wait_s / max(times.step_s, 1e-9), 4),
        "tokens_per_s": policy_tokens / max(compute_s, 1e-9),
    }


def step_record(
    step: int,
    anneal: AnnealState,
    trained: list[TrajectoryGroup],
    advantages: list[list[float]],
    seen: list[TrajectoryGroup],
    stale: list[TrajectoryGroup],
    dropped: Mapping[str, int],
    skipped: int,
    train_stats: dict[str, float],
    times: StepTimes,
    lc: LearnerConfig,
    distilled: list[str],
) -> dict[str, object]:
    """The record of step ``step`` (0-based; it produced version ``step + 1``): ``trained`` are the groups
    it trained on and ``advantages`` their samples' advantages as trained, ``seen`` every group it read,
    ``stale`` those past ``max_version_lag``, ``dropped`` the run's drop counts by reason, ``skipped`` the
    prompts the feeder skipped so far, ``train_stats`` what the trainer returned, ``distilled`` the prompt id of
    each sample ``learner.internalize`` added (which facts a run distilled, and how often, is read from them)."""
    return {
        "step": step + 1,
        **step_timing(times, train_stats["policy_tokens"]),
        **anneal.model_dump(exclude={"step"}),
        **rollout_stats(seen, step),
        "groups_trained": len(trained),
        "kept_calls_per_episode": calls_per_episode(trained),
        **advantage_by_mode(trained, advantages),
        **token_lags(trained, step),
        "stale_calls_per_episode": calls_per_episode(stale) if stale else None,
        "group_ids": [g.group_id for g in trained],
        "distilled_prompts": distilled,
        "dropped": dict(dropped),
        "prompts_skipped": skipped,
        **train_stats,
        "reward": fmean([r for g in trained for r in outcome_rewards(g, lc)]),
        "penalty_trained": fmean([g.anneal.penalty for g in trained]),
    }


class StepLog:
    """Appends each step's record to ``metrics.jsonl``, then mirrors it to the trackers and the gauges."""

    def __init__(self, cfg: EAPOConfig):
        self.path = cfg.run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.gauges = StepGauges("eapo_learner")
        self.tracker = Tracker(cfg, "learner")

    def write(self, step: int, record: dict[str, object]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(record, step)
        self.gauges.update(record)

    def recover(self, record: dict[str, object] | None) -> bool:
        """On resume, with the record the checkpoint holds of its own step (its times up to the checkpoint):
        a learner killed between its checkpoint and its log line trained that step but never logged it, so
        the record is appended now, marked ``recovered``. A line the kill cut short is dropped first."""
        self._drop_partial_line()
        if record is None or self.last_step() >= int(record["step"]):
            return False
        self.write(int(record["step"]), record | {"recovered": True})
        return True

    def last_step(self) -> int:
        """The step of the log's last whole record; 0 before the first."""
        if not self.path.exists():
            return 0
        for line in reversed(self.path.read_text().splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    def _drop_partial_line(self) -> None:
        """Cut the log back to its last newline: every line ``write`` finished ends with one."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def close(self) -> None:
        self.tracker.close()
