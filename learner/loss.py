"""Rewards, group-relative advantages and the DAPO token-level clipped objective.

Only policy-sampled tokens (loss mask 1) enter the loss and its normalization; prompt tokens, expert
answers and unavailable notes are observations.
"""

from __future__ import annotations

import torch

from eapo.core.config import LearnerConfig
from proto import Trajectory, TrajectoryGroup


def overlong_penalty(policy_tokens: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment, on policy tokens only: 0 up to ``max_tokens − buffer``, then
    linearly down to −1 at ``max_tokens``, −1 beyond."""
    if policy_tokens <= max_tokens - buffer:
        return 0.0
    return max(-1.0, (max_tokens - buffer - policy_tokens) / buffer)


def correctness(sample: Trajectory, check_work: bool) -> float:
    """The score the learner rewards: the rollout's, or 0 where ``check_work`` and the answer's own written
    equations do not all hold (``learner.check_work``)."""
    return 0.0 if check_work and sample.work_holds is False else sample.score


def outcome_rewards(group: TrajectoryGroup, cfg: LearnerConfig) -> list[float]:
    """The outcome part of each sample's reward: correctness [+ DAPO's overlong shaping]. No consult
    penalty here: it enters the advantage at its own scale (``group_advantages``)."""
    rewards = []
    for s in group.samples:
        r = correctness(s, cfg.check_work)
        if cfg.overlong_max_tokens is not None:
            r += overlong_penalty(s.policy_tokens, cfg.overlong_max_tokens, cfg.overlong_buffer)
        rewards.append(r)
    return rewards


def has_signal(group: TrajectoryGroup, *, check_work: bool, eps: float = 1e-9) -> bool:
    """Dynamic sampling as in DAPO, whose code filters on accuracy: a group whose correctness scores (as
    rewarded, ``correctness``) are all equal carries no outcome signal and is dropped, whatever its consult
    counts or lengths."""
    scores = [correctness(s, check_work) for s in group.samples]
    return max(scores) - min(scores) > eps


def consult_counts(group: TrajectoryGroup) -> list[int]:
    """Consultations charged per sample: every query the policy asked, shown or not, sent or withheld (the
    policy decides to ask; whether the answer is shown is the acceptance draw's doing, not the policy's)."""
    return [len(s.consults) for s in group.samples]


def group_advantages(
    rewards: list[float],
    calls: list[int] | None = None,
    penalty: float = 0.0,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> list[float]:
    """GRPO/DAPO advantages of the outcome, then the consult penalty at its own scale:

        A_i = (r_i − mean r) / (std r + eps)  −  λ · (c_i − mean c)

    The outcome part is divided by the group std (unless ``normalize_std`` is off); the penalty part never
    is, so a penalty difference of λ·Δc moves an advantage by exactly λ·Δc. With binary scores two samples
    that differ in outcome differ by ≥ 2 in the first term (std ≤ 0.5), so for λ·Δc < 2 a correct sample
    that consulted always ranks above a wrong one that did not. Both parts sum to zero over the group.
    """
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = r - r.mean()
    if normalize_std:
        adv = adv / (r.std(unbiased=False) + eps)
    if calls is not None and penalty:
        c = torch.tensor(calls, dtype=torch.float64)
        adv = adv - penalty * (c - c.mean())
    return adv.tolist()


def sample_advantages(group: TrajectoryGroup, cfg: LearnerConfig) -> list[float]:
    """The advantage of each sample of ``group``, with λ as recorded with the group at rollout (DESIGN §4),
    not the learner's current λ."""
    return group_advantages(
        outcome_rewards(group, cfg), consult_counts(group), group.anneal.penalty, cfg.normalize_advantages
    )


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) for t ≥ 1, aligned to ``input_ids[:, 1:]``; position 0 gets 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))


def dapo_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.20,
    clip_high: float = 0.28,
    importance: str = "none",
    weight_cap: float = 5.0,
    normalizer: float | None = None,
    proximal_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate, summed over policy tokens and divided by ``normalizer``
    (default: this batch's policy-token count; pass the whole step's count when micro-batching).

    ``logprobs``, ``behaviour_logprobs``, ``mask``: [B, T]; ``advantages``: [B] (one per sample).
    importance="none": ratio π_θ/π_behaviour, clipped (PPO with the behaviour policy as old policy).
    "decoupled": ratio π_θ/π_prox, clipped, times w = π_prox/π_behaviour; tokens with w > cap leave the
    loss (AReaL's decoupled PPO). π_prox is the policy before this step's first update:
    ``proximal_logprobs`` when the step makes several updates, else ``logprobs`` detached (the same thing).
    "truncated": as decoupled, but w is capped at ``weight_cap`` instead (truncated IS).
    """
    # Masked slots are zeroed before exp: whatever an observation token holds cannot overflow into the loss.
    policy_mask = mask = mask.bool()
    if importance == "none":
        ratio = torch.exp(torch.where(mask, logprobs - behaviour_logprobs, 0.0))
        weight = torch.ones_like(logprobs)
    elif importance in ("decoupled", "truncated"):
        proximal = logprobs.detach() if proximal_logprobs is None else proximal_logprobs
        ratio = torch.exp(torch.where(mask, logprobs - proximal, 0.0))
        weight = torch.exp(torch.where(mask, proximal - behaviour_logprobs, 0.0))
        if importance == "decoupled":
            mask = mask & (weight <= weight_cap)
        weight = weight.clamp(max=weight_cap)
    else:
        raise ValueError(f"unknown importance correction {importance!r}")
    m = mask.float()
    adv = advantages[:, None].expand_as(ratio)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    n = float(normalizer) if normalizer is not None else m.sum().clamp(min=1.0)
    loss = -(weight * surrogate * m).sum() / n
    with torch.no_grad():
        count = m.sum().clamp(min=1.0)
        stats = {
            "clip_frac_low": float((((ratio < 1.0 - clip_low) & (adv < 0)).float() * m).sum() / count),
            "clip_frac_high": float((((ratio > 1.0 + clip_high) & (adv > 0)).float() * m).sum() / count),
            "ratio_mean": float((ratio * m).sum() / count),
            "is_weight_mean": float((weight * m).sum() / count),
            "is_weight_max": float((weight * m).max()) if m.any() else 0.0,
            "is_masked_tokens": float(policy_mask.sum() - m.sum()),
            "policy_tokens": float(m.sum()),
        }
    return loss, stats


def kl_penalty(
    logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None
) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) on policy tokens with the non-negative k3 estimator e^{r} − r − 1, r = log π_ref − log π_θ;
    summed and divided like the policy loss, so micro-batches add up."""
    mask = mask.bool()
    r = torch.where(mask, reference_logprobs - logprobs, 0.0)
    k3 = torch.exp(r) - r - 1.0
    n = float(normalizer) if normalizer is not None else mask.float().sum().clamp(min=1.0)
    return (k3 * mask.float()).sum() / n
