import itertools

import pytest

from eapo.core.config import AnnealConfig, ScheduleConfig
from learner.anneal import anneal_state, value


@pytest.mark.parametrize(
    "kind,step,expected",
    [
        ("constant", 50, 1.0),
        ("linear", 0, 1.0),
        ("linear", 5, 1.0),
        ("linear", 30, 0.5),
        ("linear", 55, 0.0),
        ("linear", 500, 0.0),
        ("cosine", 30, 0.5),
        ("cosine", 5, 1.0),
        ("cosine", 55, 0.0),
        ("step", 14, 1.0),
        ("step", 15, 0.8),
        ("step", 34, 0.6),
        ("step", 55, 0.0),
    ],
)
def test_schedule_families(kind, step, expected):
    cfg = ScheduleConfig(kind=kind, start=1.0, end=0.0, hold=5, steps=50, step_every=10)
    assert value(cfg, step) == pytest.approx(expected, abs=1e-9)


def test_exponential_decays_faster_than_linear_early_and_ends_at_end():
    exp = ScheduleConfig(kind="exponential", start=1.0, end=0.0, steps=100)
    lin = ScheduleConfig(kind="linear", start=1.0, end=0.0, steps=100)
    assert value(exp, 20) < value(lin, 20)
    assert value(exp, 100) == pytest.approx(0.0, abs=1e-12)
    values = [value(exp, s) for s in range(120)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_anneal_state_is_a_pure_function_of_step_with_integer_budget():
    cfg = AnnealConfig(budget=ScheduleConfig(start=4, end=1, steps=30))
    assert anneal_state(cfg, 7) == anneal_state(cfg, 7)
    budgets = [anneal_state(cfg, s).budget for s in range(40)]
    assert budgets[0] == 4 and budgets[-1] == 1
    assert all(isinstance(b, int) and b >= 1 for b in budgets)
    assert all(a >= b for a, b in itertools.pairwise(budgets))
