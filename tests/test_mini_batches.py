"""A learner step's mini-batches are consecutive shares of whole groups (``learner.trainer.split_groups``)."""

import pytest
import torch

from learner.trainer import TrainSample, split_groups


def samples(n: int) -> list[TrainSample]:
    return [
        TrainSample(torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool), torch.zeros(2), i)
        for i in range(n)
    ]


def advantages(shares: list[list[TrainSample]]) -> list[list[float]]:
    return [[s.advantage for s in share] for share in shares]


def test_shares_take_whole_groups_in_order():
    # Four groups of 3 in two updates: groups 0–1, then 2–3.
    assert advantages(split_groups(samples(12), [3, 3, 3, 3], 2)) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]


def test_a_batch_short_of_groups_gets_fewer_or_uneven_shares_never_a_split_group():
    # A step cut short by the drop cap: 3 groups of 2 for 2 updates → 1 group, then 2; for 8 updates → 3.
    assert advantages(split_groups(samples(6), [2, 2, 2], 2)) == [[0, 1], [2, 3, 4, 5]]
    assert advantages(split_groups(samples(6), [2, 2, 2], 8)) == [[0, 1], [2, 3], [4, 5]]


def test_group_sizes_must_account_for_every_sample():
    with pytest.raises(ValueError, match="do not add up to the 5 samples"):
        split_groups(samples(5), [2, 2], 1)
