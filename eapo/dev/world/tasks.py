"""The bundled synthetic task families: multi-step integer arithmetic with exact, verifiable answers.

Difficulty is graded by tier: tier t has t operators on single-digit operands, so tier 1 is one
table lookup and the top tier chains four operations with products carried into multi-digit
numbers: there a tiny policy fails, and a stronger expert (or a decomposition into single
operations) helps. Evaluation follows normal precedence (× before +/−, then left to right); the
worked solution rewrites one operation per step.

The ``lookup`` family adds ``#``: a seeded table of two-digit values on single-digit operands, applied
before everything else (``#``, then ×, then +/−). Unlike arithmetic, an unseen entry cannot be guessed
from the others, so a policy that never saw it finds it by sampling about once in ninety tries, and an
expert can show it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from types import MappingProxyType

from eapo.core.config import Tasks
from eapo.core.data import Problem

TIERS = (1, 2, 3, 4)
LOOKUP = "#"


Table = Mapping[tuple[int, int], int]


@functools.cache
def lookup_table(seed: str = "lookup") -> Table:
    """``a#b`` for operands 2–9: arbitrary values 10–99, not commutative. Read-only: it is cached."""
    rng = random.Random(seed)
    return MappingProxyType({(a, b): rng.randint(10, 99) for a in range(2, 10) for b in range(2, 10)})


def _apply(a: int, op: str, b: int, table: Table | None) -> int:
    if op == LOOKUP:
        return (lookup_table() if table is None else table)[(a, b)]
    return a * b if op == "*" else a + b if op == "+" else a - b


def _tokens(expr: str) -> list[str]:
    """Operands and operators; a ``-`` where an operand starts is its sign (``-14+3``, ``5--7``)."""
    out, num = [], ""
    for ch in expr:
        if ch.isdigit() or (ch == "-" and not num):
            num += ch
        else:
            out += [num, ch]
            num = ""
    return [*out, num]


def solution_steps(expr: str, table: Table | None = None) -> list[tuple[str, int]]:
    """The single operations that solve ``expr``, as (``"a*b"``, value), in the order a solver does them;
    ``#`` looks up ``table`` (default: ``lookup_table()``)."""
    toks = _tokens(expr)
    steps: list[tuple[str, int]] = []
    for ops in (LOOKUP, "*", "+-"):
        i = 1
        while i < len(toks):
            if toks[i] in ops:
                a, op, b = int(toks[i - 1]), toks[i], int(toks[i + 1])
                value = _apply(a, op, b, table)
                steps.append((f"{a}{op}{b}", value))
                toks[i - 1 : i + 2] = [str(value)]
            else:
                i += 2
    return steps


def unseen_facts(share: float, seed: str = "unseen", ops: str = "+-*") -> frozenset[str]:
    """A seeded ``share`` of the single-digit operations of ``ops`` (``"7*8"``, operands 2–9), a fact of ``+`` or
    ``*`` and its commutative twin together: what a policy SFT'd without them cannot know, and the experts do."""
    rng = random.Random(seed)
    facts = [(a, op, b) for op in ops for a in range(2, 10) for b in range(2, 10) if op not in "+*" or a <= b]
    chosen = rng.sample(facts, round(share * len(facts)))
    return frozenset(f"{x}{op}{y}" for a, op, b in chosen for x, y in ({(a, b), (b, a)} if op in "+*" else {(a, b)}))


def needs_any(expr: str, facts: frozenset[str]) -> bool:
    """Whether solving ``expr`` takes one of ``facts`` (single operations as ``solution_steps`` writes them)."""
    return any(op in facts for op, _ in solution_steps(expr))


def evaluate(expr: str) -> int:
    steps = solution_steps(expr)
    return steps[-1][1] if steps else int(expr)


def worked_solution(expr: str, table: Table | None = None) -> str:
    """``45*3=135 23+135=158 \\boxed{158}``: one line of text the policy and experts are trained on."""
    steps = solution_steps(expr, table)
    return " ".join(f"{op}={value}" for op, value in steps) + f" \\boxed{{{steps[-1][1]}}}"


def make_problem(rng: random.Random, tier: int, index: int, split: str, tasks: Tasks = "arithmetic") -> Problem:
    """In the lookup family each operator is ``#`` with odds 1/2 unless the one before is (about 38% of them):
    ``2#3#4`` would look up 2#3's two-digit value. Arithmetic problems draw as they always did."""
    operands = [str(rng.randint(2, 9)) for _ in range(tier + 1)]
    ops: list[str] = []
    for _ in range(tier):
        lookup = tasks == "lookup" and (not ops or ops[-1] != LOOKUP) and rng.random() < 0.5
        ops.append(LOOKUP if lookup else rng.choice("+-*"))
    expr = operands[0] + "".join(op + x for op, x in zip(ops, operands[1:], strict=True))
    return Problem(id=f"{split}-{index}", problem=expr, answer=str(evaluate(expr)), tier=tier)


def make_split(seed: int, n: int, split: str, tasks: Tasks = "arithmetic") -> list[Problem]:
    rng = random.Random(f"{seed}:{split}")
    return [make_problem(rng, TIERS[i % len(TIERS)], i, split, tasks) for i in range(n)]
