"""The tiny world's task families: arithmetic as the shipped worlds drew it, and the lookup family, whose
table entries the policy cannot work out and only the experts know."""

import random
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from eapo.core.config import ModelSpec, WorldConfig
from eapo.core.data import read_jsonl
from eapo.dev.world.bootstrap import is_built, world_manifest
from eapo.dev.world.sft import CURRICULA
from eapo.dev.world.tasks import evaluate, lookup_table, make_split, solution_steps, unseen_facts, worked_solution

SHIPPED = Path(__file__).resolve().parent.parent / "docs" / "experiment-report"


@pytest.mark.parametrize("name", ["world", "world-partial", "world-unseen", "world-lookup", "world-lookup-copy"])
def test_the_shipped_worlds_are_still_what_their_configs_build(name):
    """The splits are drawn again from the world's config, and its fingerprint still matches: a change to
    the draws or to the config's fields would orphan the records made on it."""
    root = SHIPPED / name
    cfg = WorldConfig(**{**world_manifest(root)["config"], "dir": root})
    assert is_built(cfg)
    for split, n in (("train", cfg.train_problems), ("eval", cfg.eval_problems)):
        assert make_split(cfg.seed, n, split, cfg.tasks) == read_jsonl(root / f"{split}.jsonl")


def test_the_lookup_table_is_seeded_two_digit_and_not_commutative():
    table = lookup_table()
    assert len(table) == 64 and set(table) == {(a, b) for a in range(2, 10) for b in range(2, 10)}
    assert all(10 <= v <= 99 for v in table.values())
    assert table != lookup_table("other")
    assert sum(table[a, b] != table[b, a] for a, b in table) > 50


def test_lookup_comes_before_products_and_sums():
    t = lookup_table()
    assert evaluate("4#5") == t[4, 5]
    assert evaluate("2+4#4") == 2 + t[4, 4]
    assert evaluate("6#3*3+5-8") == t[6, 3] * 3 + 5 - 8
    assert solution_steps("2*4*7#5") == [("7#5", t[7, 5]), ("2*4", 8), (f"8*{t[7, 5]}", 8 * t[7, 5])]
    assert worked_solution("9-2#3") == f"2#3={t[2, 3]} 9-{t[2, 3]}={9 - t[2, 3]} \\boxed{{{9 - t[2, 3]}}}"
    assert worked_solution("9-2#3", {**t, (2, 3): 50}) == "2#3=50 9-50=-41 \\boxed{-41}"  # another table
    assert (t[2, 3], t[3, 2]) == (69, 58)  # the shipped worlds' table: a reseed would orphan them
    assert worked_solution("9-2#3") == "2#3=69 9-69=-60 \\boxed{-60}" and evaluate("3#2*2-9") == 107


def test_lookup_problems_are_half_lookups_never_two_in_a_row():
    problems = make_split(7, 400, "train", "lookup")
    ops = [ch for p in problems for ch in p.problem[1:] if not ch.isdigit()]
    assert 0.35 < ops.count("#") / len(ops) < 0.5  # half of the draws, less those after a `#`
    assert not any(re.search(r"#\d#", p.problem) for p in problems)
    assert all(int(p.answer) == evaluate(p.problem) for p in problems)
    assert {p.tier for p in problems} == {1, 2, 3, 4}


@pytest.mark.parametrize("curriculum", ["policy_lookup", "policy_lookup_copy"])
def test_the_lookup_policy_mixtures_never_show_an_unseen_entry_anywhere_in_a_trace(curriculum):
    unseen = unseen_facts(0.5, ops="#")
    assert len(unseen) == 32 and all(f[1] == "#" for f in unseen)
    written = re.compile(r"(?<!\d)(\d#\d)=")  # an entry with its value, in the policy's tokens or an expert's
    anywhere = re.compile(r"(?<!\d)\d#\d(?!\d)")  # … or only asked: in the prompt, a query
    seen_written, tiers = set(), set()
    for i in range(2000):
        prompt, body = CURRICULA[curriculum](random.Random(i))
        expr = prompt.split("Q: ")[1].split("\n")[0]
        tiers.add(len(solution_steps(expr)))
        assert not unseen & set(anywhere.findall(prompt + body)), body
        seen_written |= set(written.findall(body))
    assert len(seen_written) == 32 and tiers == {1, 2, 3, 4}  # the other half is all taught


def test_the_copy_mixture_has_the_policy_write_the_value_the_expert_showed_not_the_one_it_knows():
    direct = re.compile(r"<consult>[^<]*</consult>(?:<expert>([^<]*)</expert>)+([^<]*)<eos>")
    changed = 0
    for i in range(2000):
        prompt, body = CURRICULA["policy_lookup_copy"](random.Random(i))
        plain_prompt, plain = CURRICULA["policy_lookup"](random.Random(i))
        assert prompt == plain_prompt  # the draws are the plain mixture's
        if body == plain:
            continue
        changed += 1
        shown, written = direct.fullmatch(body).groups()  # only a direct consultation changes …
        assert "#" in prompt and shown == written  # … of a `#` problem, the policy writing what it was shown
        expr = prompt.split("Q: ")[1].split("\n")[0]
        entries = {(int(a), int(b)): int(v) for a, b, v in re.findall(r"(?<!\d)(\d)#(\d)=(\d+)", shown)}
        assert worked_solution(expr, {**lookup_table(), **entries}) == shown  # a consistent solution …
        assert any(lookup_table()[key] != v for key, v in entries.items())  # … on a table that is not the real one
    assert 150 < changed < 350  # direct consultations (a quarter of 3/4), those of a `#` problem, all copied


def test_a_world_refuses_curricula_of_another_task_family():
    with pytest.raises(ValidationError, match="policy, expert, calculator are for arithmetic problems"):
        WorldConfig(tasks="lookup")
    with pytest.raises(ValidationError, match="policy are for lookup problems"):
        WorldConfig(policy=ModelSpec(curriculum="policy_lookup", hidden=64, layers=2, sft_steps=800))
