"""The text contract between the policy and the rollout service (paper §2.3).

Training prompts grant the consult action; evaluation prompts are minimal and grant nothing. A
consult block holds 1..K queries separated by ``QUERY_SEP``; each query's outcome is injected as one
expert block, holding the expert's answer or ``UNAVAILABLE``. The policy ends with ``\\boxed{…}``.
These strings are special tokens of the tiny world's tokenizer; real models use them as text.
"""

from __future__ import annotations

CONSULT_OPEN = "<consult>"
CONSULT_CLOSE = "</consult>"
EXPERT_OPEN = "<expert>"
EXPERT_CLOSE = "</expert>"
TOOLS = "<tools>"
EOS = "<eos>"
PAD = "<pad>"
QUERY_SEP = ";"
UNAVAILABLE = "unavailable"

SPECIAL_TOKENS = [PAD, EOS, TOOLS, CONSULT_OPEN, CONSULT_CLOSE, EXPERT_OPEN, EXPERT_CLOSE]


def eval_prompt(problem: str) -> str:
    """Minimal prompt: the policy answers alone. Also the prompt experts receive for a query."""
    return f"Q: {problem}\nA: "


def training_prompt(problem: str) -> str:
    """Grants the consult action (the ``<tools>`` marker; the tiny world learned its format in SFT)."""
    return f"{TOOLS}{eval_prompt(problem)}"


def consult_block(queries: list[str]) -> str:
    return f"{CONSULT_OPEN}{(QUERY_SEP + ' ').join(queries)}{CONSULT_CLOSE}"


def expert_block(answer: str | None) -> str:
    """What the policy sees for one query: the answer if accepted, else the unavailable note."""
    return f"{EXPERT_OPEN}{answer if answer is not None else UNAVAILABLE}{EXPERT_CLOSE}"


def paradigm(queries: list[str], problem: str) -> str:
    """The paper's three rollout paradigms, by a simple rule on what was asked:
    no query → self-resolution; only the problem itself → direct consultation; anything else →
    decomposition (sub-questions)."""
    if not queries:
        return "self_resolution"
    normalized = problem.replace(" ", "")
    if all(q.replace(" ", "") == normalized for q in queries):
        return "direct_consultation"
    return "decomposition"
