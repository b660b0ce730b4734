"""The CPU engines' token draw (eapo/inference/sampling.py): the temperature-scaled distribution, top-p,
seeded rows that do not depend on their batch-mates, and no token without mass."""

from __future__ import annotations

import math

import pytest
import torch

from eapo.inference.sampling import SampleRequest, draw, inverse_cdf

PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])
ROWS = 4000


def draws(temperature: float, top_p: float = 1.0) -> tuple[list[int], list[float]]:
    """One draw in each of ``ROWS`` rows of the same logits, row i seeded i."""
    requests = [SampleRequest([0], 1, temperature=temperature, top_p=top_p, seed=i) for i in range(ROWS)]
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    return draw(PROBS.log().repeat(ROWS, 1), requests, generators)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draws_follow_the_temperature_scaled_distribution(temperature):
    tokens, logprobs = draws(temperature)
    scaled = PROBS ** (1 / temperature) / (PROBS ** (1 / temperature)).sum()  # T = 0.5: 1/30, 4/30, 9/30, 16/30
    for token, p in enumerate(scaled.tolist()):
        count = tokens.count(token)
        assert abs(count - ROWS * p) < 5 * math.sqrt(ROWS * p * (1 - p)), (token, count, ROWS * p)
    for token, logprob in zip(tokens, logprobs, strict=True):
        assert logprob == pytest.approx(math.log(scaled[token]), abs=1e-5)


def test_top_p_draws_only_from_the_kept_head_and_logs_the_unfiltered_prob():
    tokens, logprobs = draws(1.0, top_p=0.65)  # 0.4 + 0.3 reach 0.65: tokens 0 and 1 are cut
    assert set(tokens) == {2, 3}
    assert tokens.count(3) / ROWS == pytest.approx(0.4 / 0.7, abs=0.03)
    assert logprobs[tokens.index(3)] == pytest.approx(math.log(0.4), abs=1e-5)


def test_greedy_rows_take_the_argmax():
    tokens, logprobs = draws(0.0)
    assert set(tokens) == {3}
    assert logprobs[0] == pytest.approx(0.0, abs=1e-5)


def test_a_rows_token_does_not_depend_on_its_batch_mates():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    requests = [SampleRequest([0], 1, seed=s) for s in (11, 12, 13)]
    batched, _ = draw(logits, requests, [torch.Generator().manual_seed(r.seed) for r in requests])
    for row, r in enumerate(requests):
        alone, _ = draw(logits[row : row + 1], [r], [torch.Generator().manual_seed(r.seed)])
        assert alone == [batched[row]]


def test_a_uniform_rounded_up_to_the_total_takes_the_last_token_with_mass():
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert inverse_cdf(probs, torch.tensor([1.0, 1.0])).tolist() == [1, 3]
    assert inverse_cdf(probs, torch.tensor([0.0, 0.5])).tolist() == [0, 2]
    assert inverse_cdf(probs, torch.tensor([0.29, 0.2499])).tolist() == [0, 0]
