"""The same batch gives the same loss and update on 1 rank, on 2 ranks (ZeRO-2, gloo on CPU), and with
token-packed micro-batches (gradient accumulation); a step of several updates (mini-batches, PPO
epochs) is the updates it stands for."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import side_by_side, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # two launches, side by side
SCRIPT = Path(__file__).with_name("dist_step.py")


def launch(world_dir, out: Path, ranks: int, *settings: str) -> list[str]:
    """A launch of ``ranks`` processes taking a step per setting (``key=value,…``, see dist_step.py)."""
    return [*torchrun(ranks), str(SCRIPT), str(world_dir), str(out), *settings]


def same_update(params: list[float], expected: list[float]) -> None:
    """Adam's first step is g/(|g| + eps)·lr: ±lr (1e-3) wherever the gradient is well above eps, and
    there the fp32 reduction order shows at ~1e-6 (1e-5 is 1% of a step). Where |g| is near eps the
    step itself swings with the reduction order, so up to 0.01% of the parameters may differ, by at
    most one step's size."""
    diff = np.abs(np.asarray(params) - np.asarray(expected))
    assert (diff > 1e-5).mean() <= 1e-4, f"{int((diff > 1e-5).sum())} parameters differ by more than 1e-5"
    assert diff.max() <= 1e-3 + 1e-6


WHOLE, PACKED = "zero_stage=2,micro_batch_tokens=1048576", "zero_stage=2,micro_batch_tokens=128"
ZERO0, ZERO3, KL = "zero_stage=0", "zero_stage=3", "kl_coef=0.1"
MINI, TWO_STEPS = "importance=none,mini_batches=2,warmup_steps=0", "importance=none,steps=2,warmup_steps=0"
EPOCHS = "on_policy=1,ppo_epochs=2,mini_batches=2,lr=0.01"  # updates big enough to leave the clip range
EPOCHS_NONE = EPOCHS + ",importance=none"
ON_POLICY = "on_policy=1"
UNSAMPLED, UNSAMPLED_ONE, UNSAMPLED_NONE = (e + ",unsampled=half" for e in (EPOCHS, ON_POLICY, EPOCHS_NONE))


@pytest.fixture(scope="module")
def ranks(world_dir, tmp_path_factory) -> dict[int, dict[str, dict]]:
    """The results of two launches, side by side (the 2-core machine's time is the bound). One rank:
    ZeRO-2 whole and token-packed, ZeRO-0, ZeRO-2 with a KL term, and ZeRO-3 last (its partitioning
    patches module construction for the rest of the process). Two ranks: ZeRO-2 whole. ZeRO-3 runs on
    one rank only: with two CPU ranks under load it aborts intermittently inside DeepSpeed/gloo
    ("terminate called without an active exception")."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    one = (WHOLE, PACKED, ZERO0, KL, MINI, TWO_STEPS, EPOCHS, EPOCHS_NONE, ON_POLICY)
    one += (UNSAMPLED, UNSAMPLED_ONE, UNSAMPLED_NONE, ZERO3)
    settings = {1: one, 2: (WHOLE,)}
    launches = {f"r{n}": launch(world_dir, tmp_path / f"r{n}.json", n, *settings[n]) for n in settings}
    side_by_side(launches, tmp_path, timeout_s=400, cwd=Path(__file__).parent.parent)
    results = {n: json.loads((tmp_path / f"r{n}.json").read_text()) for n in settings}
    assert all(results[n]["world"] == n for n in settings)
    return {n: results[n]["results"] for n in settings}


def test_two_ranks_and_micro_batches_match_one_rank(ranks):
    one_rank, two = ranks[1], ranks[2][WHOLE]
    one = one_rank[WHOLE]
    for other in (two, one_rank[PACKED]):
        assert other["tokens"] == one["tokens"]
        assert other["loss"] == pytest.approx(one["loss"], abs=1e-5)
        same_update(other["params"], one["params"])
    # ZeRO-0 and ZeRO-3 agree with ZeRO-2.
    for stage in (ZERO0, ZERO3):
        assert one_rank[stage]["loss"] == pytest.approx(one["loss"], abs=1e-5)
        same_update(one_rank[stage]["params"], one["params"])


def test_kl_term_is_zero_at_the_start_and_leaves_the_first_step_unchanged(ranks):
    plain, with_kl = ranks[1][WHOLE], ranks[1][KL]
    assert plain["kl"] is None and with_kl["kl"] == pytest.approx(0.0, abs=1e-7)
    assert with_kl["loss"] == pytest.approx(plain["loss"], abs=1e-6)


def test_mini_batches_are_consecutive_updates_on_equal_shares(ranks):
    """Two mini-batches in one step update exactly as two steps on the two halves of the batch."""
    one_step, two_steps = ranks[1][MINI], ranks[1][TWO_STEPS]
    assert one_step["updates"] == two_steps["updates"] == 2
    same_update(one_step["params"], two_steps["params"])
    moved = np.abs(np.asarray(one_step["params"]) - np.asarray(ranks[1][WHOLE]["params"]))
    assert moved.max() > 1e-3 + 1e-6  # two updates moved some parameter further than one can


def test_later_updates_of_a_step_clip_around_the_policy_before_the_step(ranks):
    """With on-policy data, decoupled PPO's proximal policy is the behaviour policy, so every one of the
    step's four updates must equal plain PPO against the behaviour policy. Had π_prox followed the
    moving policy, updates 2–4 would see a ratio of 1 (never clipped) and weights ≠ 1, and differ."""
    decoupled, plain = ranks[1][EPOCHS], ranks[1][EPOCHS_NONE]
    assert decoupled["updates"] == plain["updates"] == 4
    assert plain["clipped"] > 0.01  # tokens left the clip range: a π_prox that moved along would differ
    assert decoupled["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    same_update(decoupled["params"], plain["params"])


def test_samples_without_behaviour_train_on_policy_from_the_steps_start(ranks):
    """A distilled sample (learner.distill) was never sampled in its context: with no behaviour log-probs
    it must train exactly as if the policy at the step's start had sampled it, beside sampled ones, in a
    step of one update and through every update of a step of four."""
    pairs = ((UNSAMPLED, EPOCHS), (UNSAMPLED_ONE, ON_POLICY), (UNSAMPLED_NONE, EPOCHS_NONE))
    for name, reference in pairs:
        got, expected = ranks[1][name], ranks[1][reference]
        assert got["updates"] == expected["updates"]
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        same_update(got["params"], expected["params"])
