"""``benchmarks.solution_likelihood``: log p(solution | prompt) sums the right tokens' log-probs, and its
"alone" form is a proper distribution over answers that do not open with the excluded token."""

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from benchmarks.solution_likelihood import solution_logprob

VOCAB = 12


def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=32,
    )
    return Qwen2ForCausalLM(config).eval()


def test_log_likelihoods_sum_to_one_over_every_continuation_with_or_without_the_excluded_first_token():
    m, prompt = model(), [3, 1, 4]
    pairs = [[a, b] for a in range(VOCAB) for b in range(VOCAB)]
    assert math.fsum(math.exp(solution_logprob(m, prompt, s, None)) for s in pairs) == pytest.approx(1.0, abs=1e-5)
    alone = [s for s in pairs if s[0] != 5]
    assert math.fsum(math.exp(solution_logprob(m, prompt, s, 5)) for s in alone) == pytest.approx(1.0, abs=1e-5)
    # a two-token answer: the chain rule over the model's own next-token distributions
    with torch.no_grad():
        first = torch.log_softmax(m(torch.tensor([prompt])).logits[0, -1], -1)
        second = torch.log_softmax(m(torch.tensor([[*prompt, 7]])).logits[0, -1], -1)
    expected = first[7] + second[2]
    assert solution_logprob(m, prompt, [7, 2], None) == pytest.approx(expected.item(), abs=1e-5)
    given_not_5 = expected.item() - math.log1p(-first[5].exp().item())
    assert solution_logprob(m, prompt, [7, 2], 5) == pytest.approx(given_not_5, abs=1e-5)


def test_the_alone_form_stays_finite_when_the_model_is_all_but_sure_to_open_with_the_excluded_token():
    m, prompt = model(), [3, 1, 4]
    with torch.no_grad():
        m.lm_head.weight[5] *= 1e4  # token 5 takes (nearly) all the mass: p(not 5) underflows as 1 − p
    value = solution_logprob(m, prompt, [7, 2], 5)
    assert math.isfinite(value)
    alone = [[a, b] for a in range(VOCAB) for b in range(VOCAB) if a != 5]
    assert math.fsum(math.exp(solution_logprob(m, prompt, s, 5)) for s in alone) == pytest.approx(1.0, abs=1e-5)
