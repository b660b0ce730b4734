"""Rewards as facts: the final answer of the policy's own text, and how it compares with the gold answer.

The answer is the last ``\\boxed{…}``, or failing that the last match of the task's own format
(``PromptTask.answer_pattern``). Math answers are judged by math-verify (equivalence: ``1/2`` = ``0.5``);
short answers by exact match after SQuAD's normalisation, with token F1 as a second fact. Shaping these
facts into a reward is the learner's business.
"""

from __future__ import annotations

import ast
import operator
import re
import string
from collections import Counter
from functools import lru_cache

from math_verify import parse, verify

from proto.episode_format import extract_boxed
from proto.schemas import AnswerKind

INTEGER = re.compile(r"[+-]?\d+")
# math-verify reads an answer up to the first of these and drops the rest (``6#3`` is 6, ``6$3`` ends our
# ``$…$``): never part of a math answer, so an answer holding one is wrong, not its prefix.
NOT_MATH = re.compile(r"[#&$?]")
# An integer equation as worked solutions write them, one operation or a chain, no spaces: ``56-27=29``,
# ``-3+5=2``, ``2+3*4=14``; it starts the text or follows a space or an opening bracket, so ``5+3=8`` inside
# ``4#5+3=8`` or ``x=2+3=5`` is no equation, and it ends at a number (``7*8=50+6`` and ``2+3=5.5`` are not judged,
# ``7*8=55.`` is). Operands of up to 9 digits and at most 8 operators keep it bounded.
EQUATION = re.compile(r"(?<![^\s({\[])(-?\d{1,9}(?:[-+*]-?\d{1,9}){1,8})=(-?\d{1,18})(?![\w*/^+\-=]|\.\d)")
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
PUNCTUATION = frozenset(string.punctuation)
ARTICLES = frozenset({"a", "an", "the"})


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The last ``\\boxed{…}``; without one, the first group of ``pattern``'s last match, if any."""
    boxed = extract_boxed(text)
    if boxed is not None or pattern is None:
        return boxed
    matches = list(re.finditer(pattern, text))
    return ((matches[-1].group(1) or "").strip() or None) if matches else None


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def token_f1(answer: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after ``normalize`` (SQuAD's F1)."""
    said, want = normalize(answer).split(), normalize(gold).split()
    common = sum((Counter(said) & Counter(want)).values())
    if not said or not want or not common:
        return float(said == want)
    precision, recall = common / len(said), common / len(want)
    return 2 * precision * recall / (precision + recall)


def judge(answer: str | None, gold: str, kind: AnswerKind = "math") -> tuple[float, float | None]:
    """(correctness, token F1): F1 for short answers only."""
    if kind == "short":
        if answer is None:
            return 0.0, 0.0
        return float(normalize(answer) == normalize(gold)), token_f1(answer, gold)
    return score(answer, gold), None


def work_holds(text: str) -> bool | None:
    """Whether every integer equation written in ``text`` (``7*8=56``, ``56-27=29``) holds; None if it writes
    none. A fact about the shown work, beside the answer's correctness: after an expert's answer a policy can
    copy the right box below a chain of its own that is wrong, and an outcome reward credits that chain
    (``learner.check_work`` can refuse the credit). Other equations (``4#5=47``, ``x=3``) are not judged."""
    found = [(lhs, int(rhs)) for lhs, rhs in EQUATION.findall(text)]
    return all(_arithmetic(lhs) == rhs for lhs, rhs in found) if found else None


def _arithmetic(expr: str) -> int:
    """The value of an integer ``+ - *`` expression with the usual precedence (``EQUATION``'s left side)."""

    def value(node: ast.expr) -> int:
        if isinstance(node, ast.BinOp):
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp):  # a negative operand: EQUATION admits no other unary operator
            return -value(node.operand)
        assert isinstance(node, ast.Constant)
        return node.value

    # Python's grammar refuses leading zeros (``010``), which a sampled answer may write: drop them first
    return value(ast.parse(re.sub(r"\d+", lambda m: str(int(m.group())), expr), mode="eval").body)


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
    if NOT_MATH.search(answer):
        return 0.0
    try:
        return float(verify(_parsed_gold(gold), parse(f"${answer}$")))
    except Exception:  # math-verify can fail on arbitrary model text; a wrong answer, not a crash
        return 0.0
