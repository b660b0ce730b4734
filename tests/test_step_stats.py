"""A learner step's metrics record: rollout statistics over every group read, the rest over those trained."""

import json
import math
from collections import Counter

import numpy as np
import pytest
from helpers import consult_group, group

from eapo.core.config import EAPOConfig, LearnerConfig
from learner.loss import sample_advantages
from learner.step_stats import StepLog, StepTimes, advantage_by_mode, rollout_stats, step_record, token_lags
from proto import AnnealState, TrajectoryGroup, TurnRecord


def test_a_step_record_tells_what_was_read_from_what_was_trained():
    rng = np.random.default_rng(0)
    mixed, flat, stale = group(rng, [1, 0]), group(rng, [1, 1]), group(rng, [0, 0])
    record = step_record(
        3,
        AnnealState(step=3, acceptance=0.5, budget=2, penalty=0.25),
        trained=[mixed],
        advantages=[sample_advantages(mixed, LearnerConfig())],
        seen=[mixed, flat, stale],
        stale=[stale],
        dropped=Counter(zero_signal=1, stale=1),
        skipped=5,
        train_stats={"loss": 0.5, "policy_tokens": 40.0},
        times=StepTimes(run_s=12.3456, wait_s=1.0, step_s=5.0),
        lc=LearnerConfig(),
        distilled=["p-7", "p-7"],
    )
    assert record["step"] == 4 and record["acceptance"] == 0.5 and "budget" in record
    assert record["groups_read"] == 3 and record["accuracy"] == pytest.approx(0.5)  # over all six samples
    assert record["version_lag_mean"] == 3.0  # every turn sampled by version 0, the learner at 3
    assert record["groups_trained"] == 1 and record["group_ids"] == [mixed.group_id]
    assert record["reward"] == 0.5 and record["penalty_trained"] == 0.0  # the groups' own anneal state
    assert record["stale_calls_per_episode"] == 0.0 and record["dropped"] == {"zero_signal": 1, "stale": 1}
    assert record["prompts_skipped"] == 5 and record["distilled_prompts"] == ["p-7", "p-7"]
    assert (record["time_s"], record["wait_s"], record["step_s"]) == (12.35, 1.0, 4.0)
    assert record["idle_ratio"] == 0.2 and record["tokens_per_s"] == 10.0 and record["loss"] == 0.5
    assert record["accuracy_alone"] == pytest.approx(0.5) and record["accuracy_consulting"] is None
    assert record["advantage_alone"] == pytest.approx(0.0) and record["advantage_consulting"] is None


def test_token_lag_weights_each_turn_by_its_tokens():
    g = group(np.random.default_rng(0), [1, 0])
    a, b = g.samples
    a.turns = [
        TurnRecord(start=8, end=18, policy_version=2, finish="consult"),  # 10 tokens, 3 behind at step 5
        TurnRecord(start=20, end=50, policy_version=5, finish="eos"),  # 30 tokens, current
    ]
    b.turns = [
        TurnRecord(start=8, end=8, policy_version=0, finish="length"),  # no tokens: lags nothing
        TurnRecord(start=8, end=28, policy_version=4, finish="eos"),  # 20 tokens, 1 behind
    ]
    lags = token_lags([g], learner_version=5)
    assert lags == {"token_lag_mean": pytest.approx((10 * 3 + 20 * 1) / 60), "token_lag_max": 3.0}


def test_mode_accuracies_cover_every_group_read_and_mode_advantages_only_those_trained():
    trained = consult_group([(1.0, 1), (0.0, 0)], penalty=0.0)  # consulted and right; alone and wrong
    stale = consult_group([(1.0, 0), (0.0, 2)], penalty=0.0)  # the reverse, read but not trained
    record = step_record(
        0,
        AnnealState(step=0, acceptance=1, budget=2, penalty=0),
        trained=[trained],
        advantages=[sample_advantages(trained, LearnerConfig())],
        seen=[trained, stale],
        stale=[stale],
        dropped=Counter(stale=1),
        skipped=0,
        train_stats={"loss": 0.0, "policy_tokens": 4.0},
        times=StepTimes(run_s=1.0, wait_s=0.0, step_s=1.0),
        lc=LearnerConfig(),
        distilled=[],
    )
    assert record["accuracy_alone"] == 0.5 and record["accuracy_consulting"] == 0.5  # both groups
    assert record["advantage_alone"] == pytest.approx(-1.0, abs=1e-5)  # the trained group only
    assert record["advantage_consulting"] == pytest.approx(1.0, abs=1e-5)


def as_trained(groups: list[TrajectoryGroup]) -> list[list[float]]:
    return [sample_advantages(g, LearnerConfig()) for g in groups]


def test_advantage_by_mode_against_hand_computed_values():
    # Group 1: three consulted and were right, the one that answered alone was wrong. Scores' mean 0.75,
    # std sqrt(3)/4: consulting +1/sqrt(3) each, alone -sqrt(3); λ = 0.1 moves them by -0.1·(1 - 0.75)
    # and +0.1·0.75. Group 2, λ = 0: the one alone was right (+1), the one that consulted wrong (-1).
    lost = consult_group([(1.0, 1), (1.0, 1), (1.0, 1), (0.0, 0)], penalty=0.1)
    won = consult_group([(0.0, 1), (1.0, 0)], penalty=0.0)
    by_mode = advantage_by_mode([lost, won], as_trained([lost, won]))
    alone = (-math.sqrt(3) + 0.075 + 1.0) / 2
    consulting = (3 * (1 / math.sqrt(3) - 0.025) - 1.0) / 4
    expected = {"advantage_alone": alone, "advantage_consulting": consulting}  # up to the std's eps of 1e-6
    assert by_mode == pytest.approx(expected, abs=1e-5)
    lone = advantage_by_mode([lost], as_trained([lost]))["advantage_alone"]
    assert lone == pytest.approx(-math.sqrt(3) + 0.075, abs=1e-5)
    by_mode = advantage_by_mode([won, won], as_trained([won, won]))
    assert by_mode == pytest.approx({"advantage_alone": 1.0, "advantage_consulting": -1.0}, abs=1e-5)
    no_consult = group(np.random.default_rng(0), [1, 0])
    by_mode = advantage_by_mode([no_consult], as_trained([no_consult]))
    assert by_mode == {"advantage_alone": 0.0, "advantage_consulting": None}


def test_a_step_lost_between_checkpoint_and_log_line_is_logged_on_resume(tmp_path):
    log = StepLog(EAPOConfig(run_dir=tmp_path))
    assert log.last_step() == 0 and not log.recover(None)  # a fresh run: no checkpoint, nothing to recover
    for step in (1, 2):
        log.write(step, {"step": step, "loss": 0.1 * step})
    assert not log.recover({"step": 2, "loss": 0.2})  # the checkpoint's step was logged: not twice
    assert log.recover({"step": 3, "loss": 0.3})  # killed after checkpointing step 3, before its line
    assert not log.recover({"step": 3, "loss": 0.3})
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2] == {"step": 3, "loss": 0.3, "recovered": True} and "recovered" not in records[1]

    # killed halfway through step 4's line: the fragment goes, the checkpoint's record takes its place
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')
    assert log.last_step() == 3
    assert log.recover({"step": 4, "loss": 0.4})
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[3]["recovered"]
    # a blank line does not hide the last record
    with open(log.path, "a") as f:
        f.write("\n")
    assert log.last_step() == 4 and not log.recover({"step": 4, "loss": 0.4})


def test_right_answers_are_counted_by_their_work_and_mode():
    # alone: right and worked, right below wrong work, right with none, wrong below wrong work (not right)
    # consulting: right below wrong work, right and worked
    g = consult_group([(1.0, 0), (1.0, 0), (1.0, 0), (0.0, 0), (1.0, 1), (1.0, 2)], penalty=0.0)
    for sample, holds in zip(g.samples, (True, False, None, False, False, True), strict=True):
        sample.work_holds = holds
    stats = rollout_stats([g], learner_version=0)
    assert stats["right_wrong_work_alone"] == pytest.approx(1 / 3) and stats["right_no_work_alone"] == pytest.approx(
        1 / 3
    )
    assert stats["right_wrong_work_consulting"] == 0.5 and stats["right_no_work_consulting"] == 0.0
    none_right = rollout_stats([consult_group([(0.0, 0)], penalty=0.0)], 0)
    assert none_right["right_wrong_work_alone"] is None and none_right["right_no_work_consulting"] is None
