"""The text contract between the policy and the rollout service (paper §2.3).

Training prompts grant the consult action; evaluation prompts are minimal and grant nothing. A
consult block holds 1..K queries separated by ``QUERY_SEP``; each query's outcome is injected as one
expert block, holding the expert's answer or ``UNAVAILABLE``. The policy ends with ``\\boxed{…}``.
These strings are special tokens of the tiny world's tokenizer; real models use them as text (a turn
ends on the closing tag as a stop *string*, however the tokenizer splits or merges it).

Prompts are chat messages rendered by the policy's own chat template (``render_prompt``): a training
prompt is a system message naming the tags and K (``consult_instruction``) and the problem as the user
message; an evaluation prompt is the problem alone. Expert blocks continue the policy's assistant turn
as plain text (docs/decisions.md). The tiny world's template renders these messages as
``training_prompt``/``eval_prompt`` below, the strings its policy was fine-tuned on.
"""

from __future__ import annotations

from typing import Any, Protocol

from jinja2 import TemplateError

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


class ChatTokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def consult_instruction(max_queries: int) -> str:
    """The consult action as the paper's training prompt describes it: the tags, K, the unavailable
    note and the answer format."""
    return (
        f"You may consult experts before answering. To ask, write {CONSULT_OPEN}a question{QUERY_SEP} "
        f"another question{CONSULT_CLOSE} with at most {max_queries} questions separated by '{QUERY_SEP}'. "
        f"Each answer comes back as {EXPERT_OPEN}answer{EXPERT_CLOSE}, or {EXPERT_OPEN}{UNAVAILABLE}{EXPERT_CLOSE} "
        "when no expert answered. Put your final answer in \\boxed{}."
    )


def training_messages(problem: str, max_queries: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": consult_instruction(max_queries)},
        {"role": "user", "content": problem},
    ]


def eval_messages(problem: str) -> list[dict[str, str]]:
    """Minimal: the problem alone, no consult action (also what an expert receives for a query)."""
    return [{"role": "user", "content": problem}]


def render_prompt(tokenizer: ChatTokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text under the tokenizer's own chat template, ending where the assistant speaks.

    A template that refuses a system role (some raise ``TemplateError``) gets the instruction at the
    head of the user message instead; a tokenizer without a template is an error naming the fix."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the policy's tokenizer has no chat template: add one to its tokenizer_config.json "
            "(or a chat_template.jinja next to it); see README 'Train your own model'"
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError:
        if len(messages) < 2 or messages[0]["role"] != "system":
            raise
    system, user, *rest = messages
    merged = [{"role": "user", "content": f"{system['content']}\n\n{user['content']}"}, *rest]
    return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)


def eval_prompt(problem: str) -> str:
    """The tiny world's minimal prompt (its chat template renders ``eval_messages`` as this)."""
    return f"Q: {problem}\nA: "


def training_prompt(problem: str) -> str:
    """The tiny world's training prompt: its chat template renders the consult instruction as the
    ``<tools>`` marker (its policy learned the format in SFT)."""
    return f"{TOOLS}{eval_prompt(problem)}"


def consult_block(queries: list[str]) -> str:
    return f"{CONSULT_OPEN}{(QUERY_SEP + ' ').join(queries)}{CONSULT_CLOSE}"


def expert_block(answer: str | None) -> str:
    """What the policy sees for one query: the answer if accepted, else the unavailable note."""
    return f"{EXPERT_OPEN}{answer if answer is not None else UNAVAILABLE}{EXPERT_CLOSE}"


def block_answer(block: str) -> str:
    """The text an expert block showed (``expert_block``'s inverse, given the block's decoded tokens)."""
    return block.removeprefix(EXPERT_OPEN).removesuffix(EXPERT_CLOSE)


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
