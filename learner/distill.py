"""Internalization by context distillation (``learner.internalize``; issue #18, item 6).

RL under the consult prompt rewards what the policy writes *with* the expert's answer in view, mostly a
copy of it, which does not carry over to answering alone (measured on world-unseen: the facts the experts
show are learnt only once the experts are withdrawn, ``docs/experiment.md``). So a right direct
consultation's last turn, the policy's own solution after the last shown answer, is trained a second time
as if it had followed the prompt alone, with the episode's advantage: what the expert showed becomes
something the policy writes unaided. Such a sample was never sampled in that context, so it is trained
on-policy (``TrainSample.behaviour`` None: ratio 1 at the step's start, a plain policy gradient).
"""

from __future__ import annotations

import numpy as np
import torch

from learner.trainer import TrainSample
from proto import TrajectoryGroup
from proto import episode_format as fmt


def distilled_sample(trajectory, problem: str, advantage: float) -> TrainSample | None:
    """The sample that trains ``trajectory``'s answer without the expert, or None where there is none to
    distil: only a right, positively credited direct consultation whose answer follows its last consult
    block, and that block's answer was shown."""
    consults = trajectory.consults
    if advantage <= 0 or trajectory.score < 1 or not consults:
        return None
    if fmt.paradigm([c.query for c in consults], problem) != "direct_consultation":
        return None
    shown = [c.injected_end for c in consults if c.accepted and c.outcome == "answer"]
    end = max(c.injected_end for c in consults)
    if not shown or max(shown) != end:  # the last block was not answered: no shown answer right before
        return None
    keep = np.r_[0 : trajectory.prompt_len, end : len(trajectory.token_ids)]
    return TrainSample(
        ids=torch.from_numpy(trajectory.token_ids[keep].astype("int64")),
        mask=torch.from_numpy(trajectory.loss_mask[keep].copy()),
        behaviour=None,
        advantage=advantage,
    )


def distilled_samples(group: TrajectoryGroup, advantages: list[float]) -> list[TrainSample]:
    """Every sample of ``group`` that distils (see ``distilled_sample``), in sample order."""
    out = (distilled_sample(s, group.prompt.problem, a) for s, a in zip(group.samples, advantages, strict=True))
    return [s for s in out if s is not None]
