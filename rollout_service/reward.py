"""Correctness as a fact: the last ``\\boxed{…}`` of the policy's own text, checked with math-verify."""

from __future__ import annotations

import re
from functools import lru_cache

from math_verify import parse, verify

INTEGER = re.compile(r"[+-]?\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}``, braces balanced; None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


@lru_cache(maxsize=65_536)
def _parsed_gold(gold: str) -> list:
    """A prompt's gold answer is scored against all G samples (and again on later visits): parse once."""
    return parse(f"${gold}$")


def score(answer: str | None, gold: str) -> float:
    """1.0 if ``answer`` is mathematically equivalent to ``gold``, else 0.0."""
    if answer is None or not answer.strip():
        return 0.0
    answer, gold = answer.strip(), gold.strip()
    if answer == gold:  # identical text is equivalent; math-verify costs ~0.3 ms a call
        return 1.0
    if INTEGER.fullmatch(answer) and INTEGER.fullmatch(gold):  # so do two integers (most wrong answers)
        return float(int(answer) == int(gold))
    try:
        return float(verify(_parsed_gold(gold), parse(f"${answer}$")))
    except Exception:  # math-verify can fail on arbitrary model text; a wrong answer, not a crash
        return 0.0
