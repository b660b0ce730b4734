"""Rewards, group-relative advantages and the DAPO token-level clipped objective.

Only policy-sampled tokens (loss mask 1) enter the loss and its normalization; prompt tokens, expert
answers and unavailable notes are observations.
"""

from __future__ import annotations

import torch

from proto import TrajectoryGroup


def shaped_rewards(group: TrajectoryGroup, penalty: float) -> list[float]:
    """correctness − λ·(number of consultations), per sample."""
    return [s.score - penalty * len(s.consults) for s in group.samples]


def group_advantages(rewards: list[float], normalize_std: bool = True, eps: float = 1e-6) -> list[float]:
    """GRPO/DAPO advantages: reward minus the group mean, divided by the group std when asked."""
    r = torch.tensor(rewards, dtype=torch.float64)
    centred = r - r.mean()
    if normalize_std:
        centred = centred / (r.std(unbiased=False) + eps)
    return centred.tolist()


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate, averaged over every policy token of the batch.

    ``logprobs``, ``behaviour_logprobs``, ``mask``: [B, T]; ``advantages``: [B] (one per sample).
    """
    # Masked slots are zeroed before exp: whatever an observation token holds cannot overflow into the loss.
    ratio = torch.exp(torch.where(mask, logprobs - behaviour_logprobs, 0.0))
    mask = mask.float()
    adv = advantages[:, None].expand_as(ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    n = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        low = ((ratio < 1.0 - clip_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + clip_high) & (adv > 0)).float()
        stats = {
            "clip_frac_low": float((low * mask).sum() / n),
            "clip_frac_high": float((high * mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "policy_tokens": float(mask.sum()),
        }
    return loss, stats
