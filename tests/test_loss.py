"""The DAPO objective against hand-computed values, and masking of non-policy tokens."""

import math

import numpy as np
import pytest
import torch
from helpers import consult_group

from eapo.core.config import LearnerConfig
from learner.loss import (
    dapo_loss,
    group_advantages,
    has_signal,
    kl_penalty,
    outcome_rewards,
    overlong_penalty,
    sample_advantages,
    token_logprobs,
)
from proto import AnnealState


def test_group_advantages_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5, population std 0.5 → ±1
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == pytest.approx([1, -1, -1, 1], abs=1e-5)
    assert group_advantages([1.0, 0.0], normalize_std=False) == pytest.approx([0.5, -0.5])


def test_consult_penalty_enters_after_normalising_at_its_own_scale():
    # scores 1, 1, 0, 0 → outcome ±1 (std 0.5); calls 2, 0, 1, 1 (mean 1), λ = 0.1 → −0.1, +0.1, 0, 0
    adv = group_advantages([1.0, 1.0, 0.0, 0.0], calls=[2, 0, 1, 1], penalty=0.1)
    assert adv == pytest.approx([0.9, 1.1, -1.0, -1.0], abs=1e-5)
    # unnormalised: outcome ±0.5, the penalty the same 0.1 per call of difference
    adv = group_advantages([1.0, 1.0, 0.0, 0.0], calls=[2, 0, 1, 1], penalty=0.1, normalize_std=False)
    assert adv == pytest.approx([0.4, 0.6, -0.5, -0.5])
    # λ = 0.01 on scores 1, 0 with calls 3, 0: the scale the old code blew up by 1/std
    assert group_advantages([1.0, 0.0], calls=[3, 0], penalty=0.01) == pytest.approx([0.985, -0.985], abs=1e-5)


def test_equal_scores_carry_no_outcome_signal_and_at_most_the_penalty():
    # all correct, one sample consulted once, λ = 0.01. The old objective normalised 0.99, 1, 1, 1 by its
    # std (0.0043) into −1.73, +0.58, +0.58, +0.58: a penalty as loud as a right-versus-wrong signal.
    group = consult_group([(1.0, 1), (1.0, 0), (1.0, 0), (1.0, 0)], penalty=0.01)
    assert not has_signal(group, check_work=False)
    adv = sample_advantages(group, LearnerConfig(dynamic_sampling=False))
    assert adv == pytest.approx([-0.0075, 0.0025, 0.0025, 0.0025], abs=1e-9)
    assert max(abs(a) for a in adv) <= 0.01 * 1  # λ·Δcalls
    # overlong shaping alone does not make a group informative either (DAPO filters on accuracy)
    assert not has_signal(consult_group([(0.0, 0), (0.0, 2)], penalty=0.1), check_work=False)
    assert has_signal(consult_group([(0.0, 0), (1.0, 2)], penalty=0.1), check_work=False)


@pytest.mark.parametrize("normalize", [True, False])
def test_with_a_penalty_up_to_0_1_a_correct_consulting_sample_outranks_a_wrong_silent_one(normalize):
    # Every binary-score group of 4 with up to K·(B−1) = 3·3 = 9 calls per sample, λ ≤ 0.1 (seeded draws).
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        scores = rng.integers(0, 2, 4).astype(float)
        calls = rng.integers(0, 10, 4)
        if scores.min() == scores.max():
            continue
        adv = group_advantages(list(scores), list(calls), float(rng.uniform(0, 0.1)), normalize_std=normalize)
        for i in range(4):
            for j in range(4):
                if scores[i] == 1 and scores[j] == 0 and calls[i] > 0 and calls[j] == 0:
                    assert adv[i] > adv[j]
                    checked += 1
    assert checked > 500


def test_the_penalty_is_the_one_recorded_with_the_group():
    # recorded λ 0.05 (the learner's current λ is irrelevant): scores 1, 0; calls 2, 0 → ±1 ∓ 0.05·(±1)
    group = consult_group([(1.0, 2), (0.0, 0)], penalty=0.05)
    assert sample_advantages(group, LearnerConfig()) == pytest.approx([0.95, -0.95], abs=1e-5)
    group.anneal = AnnealState(step=0, acceptance=1, budget=2, penalty=0.0)
    assert sample_advantages(group, LearnerConfig()) == pytest.approx([1.0, -1.0], abs=1e-5)


def test_check_work_takes_the_credit_from_a_right_answer_below_work_that_does_not_hold():
    # right and worked, right below a wrong chain, wrong below none, wrong and worked
    group = consult_group([(1.0, 1), (1.0, 1), (0.0, 0), (0.0, 0)], penalty=0.0)
    for sample, holds in zip(group.samples, (True, False, None, True), strict=True):
        sample.work_holds = holds
    assert sample_advantages(group, LearnerConfig()) == pytest.approx([1, 1, -1, -1], abs=1e-5)
    # rewarded 1, 0, 0, 0: mean 1/4, std sqrt(3)/4 → +sqrt(3), then −1/sqrt(3) for each of the others
    adv = sample_advantages(group, LearnerConfig(check_work=True))
    assert adv == pytest.approx([3**0.5, -(3**-0.5), -(3**-0.5), -(3**-0.5)], abs=1e-5)
    # the filter reads the same rewarded correctness: two right answers, one unworked, carry signal
    pair = consult_group([(1.0, 0), (1.0, 1)], penalty=0.0)
    pair.samples[1].work_holds = False
    assert not has_signal(pair, check_work=False) and has_signal(pair, check_work=True)
    pair.samples[0].work_holds = None  # an answer that writes no equation keeps its score
    assert has_signal(pair, check_work=True)
    pair.samples[0].score = 0.0  # wrong, and right-but-unworked: both 0 as rewarded
    assert not has_signal(pair, check_work=True)


def test_outcome_rewards_add_overlong_shaping_on_policy_tokens_only():
    group = consult_group([(1.0, 0), (1.0, 3), (0.0, 1)], penalty=0.1)
    assert outcome_rewards(group, LearnerConfig()) == pytest.approx([1.0, 1.0, 0.0])  # no penalty in here
    # overlong shaping counts policy tokens only (2 per sample here): limit 3, buffer 2 → (1-2)/2
    cfg = LearnerConfig(overlong_max_tokens=3, overlong_buffer=2)
    assert outcome_rewards(group, cfg) == pytest.approx([0.5, 0.5, -0.5])


@pytest.mark.parametrize("tokens,expected", [(10, 0.0), (12, 0.0), (14, -0.5), (16, -1.0), (99, -1.0)])
def test_overlong_penalty_by_hand(tokens, expected):
    assert overlong_penalty(tokens, max_tokens=16, buffer=4) == pytest.approx(expected)


def test_dapo_loss_hand_computed_asymmetric_clipping():
    # Two samples, three token slots each. ratios e^{Δ}: sample 0 (A=+1): 1.5, 1.0, [masked];
    # sample 1 (A=-1): 0.5, 1.1, 0.9.
    ratios = torch.tensor([[1.5, 1.0, 3.0], [0.5, 1.1, 0.9]])
    old = torch.zeros(2, 3)
    new = torch.log(ratios)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, stats = dapo_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # per-token objective min(r·A, clip(r)·A):
    #   s0: min(1.5, 1.28)=1.28; min(1.0, 1.0)=1.0
    #   s1: min(-0.5, -0.8)=-0.8; min(-1.1, -1.1)=-1.1; min(-0.9, -0.9)=-0.9
    expected = -(1.28 + 1.0 - 0.8 - 1.1 - 0.9) / 5  # token-level: mean over the 5 policy tokens
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac_high"] == pytest.approx(1 / 5)
    assert stats["clip_frac_low"] == pytest.approx(1 / 5)
    assert stats["policy_tokens"] == 5


def test_token_level_average_weights_long_samples_more():
    # Sample-level averaging would give each sample equal weight; DAPO averages over tokens.
    new = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    loss, _ = dapo_loss(new, torch.zeros(2, 4), adv, mask)
    assert loss.item() == pytest.approx(-(4 * 1 - 1) / 5)


def test_masked_tokens_get_no_gradient_and_do_not_change_the_loss():
    torch.manual_seed(0)
    new = torch.randn(3, 6, requires_grad=True)
    old = torch.randn(3, 6)
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.rand(3, 6) > 0.4
    loss, _ = dapo_loss(new, old, adv, mask)
    loss.backward()
    assert torch.all(new.grad[~mask] == 0)
    assert torch.any(new.grad[mask] != 0)
    # Garbage in masked slots (expert tokens' "log-probs") changes nothing.
    new2 = new.detach().clone()
    new2[~mask] = 1e3
    old2 = old.clone()
    old2[~mask] = -1e3
    loss2, _ = dapo_loss(new2, old2, adv, mask)
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()))


def test_token_logprobs_alignment():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    ids = torch.tensor([[0, 1, 1]])
    lp = token_logprobs(logits, ids)
    assert lp.tolist()[0] == pytest.approx([0.0, math.log(0.5), math.log(0.1)], abs=1e-6)


def test_decoupled_importance_weights_and_masks_by_hand():
    # One sample, A=+1, four policy tokens. Current (= proximal) log-probs vs behaviour log-probs give
    # weights w = π_prox/π_behav of 1, 2, 0.5, 8. With cap 5, decoupled PPO drops the last token and
    # the surrogate (ratio 1 at the proximal point) is w·A: loss = -(1 + 2 + 0.5)/3 over kept tokens.
    new = torch.zeros(1, 4, requires_grad=True)
    behaviour = -torch.log(torch.tensor([[1.0, 2.0, 0.5, 8.0]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.tensor([1.0])
    loss, stats = dapo_loss(new, behaviour, adv, mask, importance="decoupled", weight_cap=5.0)
    assert loss.item() == pytest.approx(-(1 + 2 + 0.5) / 3)
    assert stats["is_masked_tokens"] == 1 and stats["is_weight_max"] == pytest.approx(2.0)
    loss.backward()
    assert new.grad[0, 3] == 0  # the dropped token carries no gradient
    assert new.grad[0, 1] == pytest.approx(-2.0 / 3)  # d(-w·r·A)/dlogp = -w·A/n at r=1


def test_truncated_importance_caps_instead_of_dropping():
    new = torch.zeros(1, 4)
    behaviour = -torch.log(torch.tensor([[1.0, 2.0, 0.5, 8.0]]))
    loss, stats = dapo_loss(
        new, behaviour, torch.tensor([1.0]), torch.ones(1, 4, dtype=torch.bool), importance="truncated", weight_cap=5.0
    )
    assert loss.item() == pytest.approx(-(1 + 2 + 0.5 + 5) / 4)
    assert stats["is_masked_tokens"] == 0 and stats["is_weight_max"] == pytest.approx(5.0)


def test_decoupled_clips_around_the_proximal_policy_not_the_behaviour_policy():
    # A stale sample (behaviour far from current) is not clipped away: its gradient is the weighted
    # on-policy one. Plain PPO against the behaviour policy (importance="none") clips it to zero.
    new = torch.zeros(1, 2, requires_grad=True)
    behaviour = torch.full((1, 2), -0.5)  # ratio to behaviour e^{0.5} ≈ 1.65 > 1.28
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool)
    plain, _ = dapo_loss(new, behaviour, adv, mask, importance="none")
    plain.backward()
    assert torch.all(new.grad == 0)
    new.grad = None
    decoupled, _ = dapo_loss(new, behaviour, adv, mask, importance="decoupled", weight_cap=5.0)
    decoupled.backward()
    assert torch.all(new.grad < 0)


def test_normalizer_makes_micro_batches_add_up():
    torch.manual_seed(1)
    new, old = torch.randn(4, 5), torch.randn(4, 5)
    adv, mask = torch.randn(4), torch.rand(4, 5) > 0.3
    whole, _ = dapo_loss(new, old, adv, mask)
    total = float(mask.sum())
    parts = [
        dapo_loss(new[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], normalizer=total)[0] for i in (0, 2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)


def test_kl_penalty_is_zero_at_the_reference_and_pulls_toward_it():
    ref = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert kl_penalty(ref.clone(), ref, mask).item() == pytest.approx(0.0)
    new = (ref + torch.tensor([[0.3, -0.2, 5.0]])).requires_grad_(True)
    kl = kl_penalty(new, ref, mask)
    r = torch.tensor([-0.3, 0.2])  # log π_ref − log π_θ on the two policy tokens
    assert kl.item() == pytest.approx(float((torch.exp(r) - r - 1).mean()))
    kl.backward()
    assert new.grad[0, 0] > 0 and new.grad[0, 1] < 0 and new.grad[0, 2] == 0  # descent moves toward ref


def test_decoupled_with_a_recorded_proximal_policy_by_hand():
    # A later update of a step: π_θ = (0.5, 0.9), π_prox = (0.4, 0.5), π_behaviour = (0.2, 0.5), A = +1.
    # ratio π_θ/π_prox = (1.25, 1.8), w = π_prox/π_behaviour = (2, 1); the second ratio is clipped to 1.28.
    # loss = −(2·1.25 + 1·1.28)/2; only the unclipped token has a gradient, −w·r·A/n = −1.25.
    new = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_(True)
    proximal, behaviour = torch.log(torch.tensor([[0.4, 0.5]])), torch.log(torch.tensor([[0.2, 0.5]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = dapo_loss(
        new, behaviour, torch.tensor([1.0]), mask, importance="decoupled", proximal_logprobs=proximal
    )
    assert loss.item() == pytest.approx(-(2 * 1.25 + 1.28) / 2)
    assert stats["clip_frac_high"] == pytest.approx(0.5) and stats["is_weight_max"] == pytest.approx(2.0)
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([-1.25, 0.0])
