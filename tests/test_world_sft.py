"""The tiny world's SFT: the policy's trace mixtures, and a batch trained in length-sorted slices (for
speed) that must be the same update as the whole batch padded at once."""

import hashlib
import json
import random
import re

import pytest
import torch

from eapo.dev.world.sft import CURRICULA, _slices, build_tokenizer, new_model, sft
from eapo.dev.world.tasks import solution_steps, unseen_facts, worked_solution
from expert_gateway.degrade import withhold_result
from proto import episode_format as fmt


def test_slices_keep_order_and_stay_within_their_token_budget():
    rows = [([0] * n, 1) for n in (3, 4, 5, 10, 10, 30)]
    parts = _slices(rows, 20)
    assert [[len(seq) for seq, _ in part] for part in parts] == [[3, 4, 5], [10, 10], [30]]
    assert _slices(rows, 1 << 20) == [rows]


def test_sliced_sft_is_the_same_update_as_one_padded_batch():
    tok = build_tokenizer()
    params = []
    for slice_tokens in (1 << 20, 256):  # one slice; about ten for the policy's traces of 20-240 tokens
        torch.manual_seed(0)
        model = new_model(len(tok), 32, 1, 384, tok)
        loss = sft(model, tok, CURRICULA["policy"], 3, 16, seed=0, slice_tokens=slice_tokens)
        params.append((loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (whole_loss, whole), (sliced_loss, sliced) = params
    assert abs(sliced_loss - whole_loss) < 1e-5
    assert (sliced - whole).abs().max() < 1e-5
    # …and the update is not vacuous: three steps moved the parameters by much more than that.
    torch.manual_seed(0)
    untrained = torch.cat([p.detach().flatten() for p in new_model(len(tok), 32, 1, 384, tok).parameters()])
    assert (whole - untrained).abs().max() > 1e-3


def test_the_partial_policy_mixture_withholds_half_its_direct_consultations_results_and_nothing_else():
    plain, partial = random.Random(7), random.Random(7)
    withheld = direct = 0
    for _ in range(4000):
        (prompt, body), (prompt2, body2) = CURRICULA["policy"](plain), CURRICULA["policy_partial"](partial)
        assert prompt == prompt2  # the same draws: only the shown answers differ
        expr = prompt.split("Q: ")[1].split("\n")[0]
        full = fmt.expert_block(worked_solution(expr))
        direct += full in body
        if body2 != body:
            withheld += 1
            hint = fmt.expert_block(withhold_result(worked_solution(expr)))
            assert full in body and body2 == body.replace(full, hint)
            assert body2.endswith(worked_solution(expr) + fmt.EOS)  # the policy still writes the whole solution
    assert "=</expert>" not in "".join(CURRICULA["policy"](random.Random(i))[1] for i in range(200))
    assert 0.4 < withheld / direct < 0.6, (withheld, direct)


def test_unseen_facts_are_a_seeded_half_closed_under_commutation():
    facts = unseen_facts(0.5)
    assert facts == unseen_facts(0.5) and facts != unseen_facts(0.5, seed="other")
    assert {fact[1] for fact in facts} == {"+", "-", "*"}
    for a, op, b in facts:  # single-digit operands: every fact is three characters
        assert op == "-" or f"{b}{op}{a}" in facts
    # 36 unordered pairs each for + and *, 64 ordered ones for -: 68 of the 136 are chosen
    assert len({f if f[1] == "-" else "".join(sorted(f)) for f in facts}) == 68


def test_the_unseen_policy_mixture_never_shows_an_unseen_fact_anywhere_in_a_trace():
    facts, rng = unseen_facts(0.5), random.Random(3)
    written = re.compile(r"(?<![\d-])(\d[-+*]\d)=")  # a single-digit step, in the policy's tokens or an expert's
    tiers = set()
    for _ in range(2000):
        prompt, body = CURRICULA["policy_unseen"](rng)
        expr = prompt.split("Q: ")[1].split("\n")[0]
        tiers.add(len(solution_steps(expr)))
        assert not facts & {op for op, _ in solution_steps(expr)}, expr
        assert not facts & set(written.findall(body)), body
    assert tiers == {1, 2, 3, 4}  # every tier is still trained


# The shipped worlds' models were trained on these traces: a change to a mixture's draws orphans them.
SHIPPED_MIXTURES = [
    ("policy", "146bab4d540d4c95"),
    ("policy_partial", "5cc3cc8da6000199"),
    ("policy_unseen", "f33a2396b9ce0bf6"),
    ("policy_lookup", "2f8e6689e4dbb3ae"),
    ("policy_lookup_copy", "1fcfc8e852597b99"),
    ("solver_lookup", "52f23a8adc8a4f0e"),
    ("calculator_lookup", "5eb7c4223f40698f"),
]


@pytest.mark.parametrize(("curriculum", "digest"), SHIPPED_MIXTURES)
def test_the_shipped_worlds_mixtures_draw_as_they_were_built(curriculum, digest):
    rng = random.Random(0)
    traces = json.dumps([CURRICULA[curriculum](rng) for _ in range(1000)])
    assert hashlib.sha256(traces.encode()).hexdigest()[:16] == digest
