"""Internalization by context distillation (``learner.internalize``; issue #18, item 6).

RL under the consult prompt rewards what the policy writes *with* the expert's answer in view, mostly a
copy of it, which does not carry over to answering alone (measured on world-unseen: the facts the experts
show are learnt only once the experts are withdrawn, ``docs/experiment.md``). So a right direct
consultation's last turn, the policy's own solution after the last shown answer, is trained a second time
as if it had followed the prompt alone, with the episode's advantage: what the expert showed becomes
something the policy writes unaided. Such a sample was never sampled in that context, so it is trained
on-policy (``TrainSample.behaviour`` None: ratio 1 at the step's start, a plain policy gradient).

``learner.internalize_prompt`` picks the prompt the answer is trained after. ``training`` (the episode's own,
with the consult instruction) also credits answering at once under that prompt, so it pushes the consult
decision down, the more the larger the weight. ``evaluation`` (the prompt the policy is judged alone on)
leaves the consult decision to RL and trains the answer where it is needed.

``learner.internalize_weight`` multiplies these samples' advantage, so their gradient: a larger step on what
the experts showed, confined to these rows. A rote fact shown some twenty times in a run moved its
log-probability by under 2 nats at weight 1 (world-lookup-copy, ``docs/experiment.md``), and a larger lr
for the whole learner collapsed outcome-only RL.

``learner.internalize_source`` picks whose text is trained. ``policy``: the policy's own answer. But the
reward judges only the final answer, and after a shown answer the policy can copy the box below a chain of
its own that is wrong: on world-unseen a fifth of these answers were not the worked solution, and trained
after the evaluation prompt they taught it chains that do not lead to their box (``docs/experiment.md``).
``expert``: the shown answer itself, where its final answer is the policy's right one, so the chain trained
is the expert's: the reasoning the paper wants internalized.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from eapo.core.config import InternalizeSource, LearnerConfig
from eapo.inference.model import prompt_ids
from learner.loss import correctness
from learner.trainer import TrainSample
from proto import ConsultRecord, Trajectory, TrajectoryGroup
from proto import episode_format as fmt


def distilled_sample(
    trajectory: Trajectory,
    problem: str,
    advantage: float,
    tok: PreTrainedTokenizerFast,
    weight: float = 1.0,
    prompt: Sequence[int] | None = None,
    source: InternalizeSource = "policy",
    check_work: bool = False,
) -> TrainSample | None:
    """The sample that trains ``trajectory``'s answer without the expert, or None where there is none to
    distil. Only a right, positively credited direct consultation whose last query's answer was shown, and
    whose answer is the one turn right after it, with no consult or expert block in its text (in the budget's
    last turn a block is not executed and stays in the text; a malformed one is answered "unavailable" after
    the last query, so the answer no longer follows it; an expert block the policy wrote itself is no answer).
    The answer follows ``prompt`` (default: the episode's own), and its advantage is the episode's times
    ``weight``. ``source`` "expert" trains, instead of the policy's answer, the first answer shown for the last
    consult block whose final answer is the policy's right one (None if none agrees, or that one holds a block),
    ended with the policy's own stop token. Right means right as rewarded (``correctness``, ``check_work``): a
    consult penalty alone can give an unrewarded answer a positive advantage."""
    consults, turns = trajectory.consults, trajectory.turns
    if advantage <= 0 or correctness(trajectory, check_work) < 1 or not consults or not turns:
        return None
    if fmt.paradigm([c.query for c in consults], problem) != "direct_consultation":
        return None
    end = max(c.injected_end for c in consults)
    shown = any(c.accepted and c.injected_end == end for c in consults)
    if not shown or turns[-1].start != end:
        return None
    if _holds_block(tok.decode(trajectory.token_ids[end:].tolist())):
        return None
    head = trajectory.token_ids[: trajectory.prompt_len] if prompt is None else np.asarray(prompt)
    if source == "policy":
        answer, mask = trajectory.token_ids[end:], trajectory.loss_mask[end:]
    else:
        last_block = [c for c in consults if c.turn == consults[-1].turn and c.accepted]
        texts = [_shown(trajectory, c, tok) for c in last_block]
        agreeing = [text for text in texts if _agrees(text, trajectory.final_answer)]
        if not agreeing or _holds_block(agreeing[0]):
            return None
        # ended as the policy's own turn was (its stop token), else with the tokenizer's EOS
        closing = int(trajectory.token_ids[-1]) if turns[-1].finish == "eos" else tok.eos_token_id
        answer = np.array([*tok.encode(agreeing[0], add_special_tokens=False), closing])
        mask = np.ones(len(answer), bool)
    return TrainSample(
        ids=torch.from_numpy(np.concatenate([head, answer]).astype("int64")),
        mask=torch.from_numpy(np.r_[np.zeros(len(head), bool), mask]),
        behaviour=None,
        advantage=advantage * weight,
    )


def _holds_block(text: str) -> bool:
    """A consult or expert block in an answer: never trained after the prompt alone (see distilled_sample)."""
    return fmt.CONSULT_OPEN in text or fmt.EXPERT_OPEN in text


def _shown(trajectory: Trajectory, consult: ConsultRecord, tok: PreTrainedTokenizerFast) -> str:
    """The answer as the policy saw it, read from the injected tokens (``ConsultRecord.detail`` is cut short)."""
    return fmt.block_answer(tok.decode(trajectory.token_ids[consult.injected_start : consult.injected_end].tolist()))


def _agrees(shown: str, final: str | None) -> bool:
    """Whether a shown answer's last box is the policy's right final answer, as text: the learner has no
    verifier (the reward is the rollout's), so an equivalent form (``0.5`` for ``1/2``) or an answer without
    a closed box does not agree, which only drops a sample."""
    boxed = fmt.extract_boxed(shown)
    return boxed is not None and final is not None and boxed.strip() == final.strip()


def distilled_samples(
    group: TrajectoryGroup, advantages: list[float], tok: PreTrainedTokenizerFast, lc: LearnerConfig
) -> list[TrainSample]:
    """Every sample of ``group`` that distils (see ``distilled_sample``), in sample order, after the prompt and
    with the weight ``lc`` names."""
    problem = group.prompt.problem
    prompt = prompt_ids(tok, problem, None) if lc.internalize_prompt == "evaluation" else None
    samples = zip(group.samples, advantages, strict=True)
    weight, source = lc.internalize_weight, lc.internalize_source
    out = (distilled_sample(s, problem, a, tok, weight, prompt, source, lc.check_work) for s, a in samples)
    return [s for s in out if s is not None]
