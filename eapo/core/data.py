"""Loaders for real training and evaluation sets: JSONL or Parquet, fields chosen by (dotted) path.

Core data code (the learner reads the training set, ``eapo eval`` the evaluation set; the ``data``
config section names both). The Parquet files of the Hugging Face hub's AIME/AIMO/DAPO sets are read
with pyarrow, without the ``datasets`` library: nothing is downloaded at run time.

Layouts we ship presets for (field paths into one record):
- ``aime`` / ``aimo``: ``problem``, ``answer``
- ``dapo``: DAPO-Math-17k — ``prompt`` is a chat list whose last user message holds the problem,
  ``reward_model.ground_truth`` the answer (the problem is re-rendered with the policy's own chat
  template and the consult instruction, so only the user's text is kept; it asks for ``Answer: …``,
  which the layout's answer pattern reads when there is no ``\\boxed{}``);
- ``world``: the tiny world's splits (``id``, ``tier``).
Any other layout: pass ``problem_field``/``answer_field`` (and ``id_field``) yourself; for short-answer
sets (QA) set ``answer_kind="short"`` (exact match and F1), and ``answer_pattern`` where the task has its
own answer format (a regex whose first group is the answer, e.g. ``"Answer: (.+)"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from eapo.core.config import EAPOConfig
from proto.schemas import AnswerKind, PromptTask


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    tier: int
    answer_kind: AnswerKind = "math"
    answer_pattern: str | None = None

    def __post_init__(self) -> None:
        self.task()  # a bad answer_kind or answer_pattern is refused here, where the file and line are known

    def task(self, prompt_id: str | None = None, admitted_at_step: int = 0) -> PromptTask:
        """The problem as a prompt to roll out (``prompt_id`` defaults to the problem's id)."""
        return PromptTask(prompt_id=prompt_id or self.id, problem=self.problem, answer=self.answer, tier=self.tier,
                          admitted_at_step=admitted_at_step, answer_kind=self.answer_kind,
                          answer_pattern=self.answer_pattern)  # fmt: skip


def write_jsonl(problems: list[Problem], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(p)) + "\n" for p in problems))


def read_jsonl(path: Path) -> list[Problem]:
    problems = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            kind, pattern = row.get("answer_kind", "math"), row.get("answer_pattern")
            problems.append(
                Problem(str(row["id"]), str(row["problem"]), str(row["answer"]), int(row["tier"]), kind, pattern)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a problem record ({exc})") from exc
    return problems


@dataclass(frozen=True)
class Layout:
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    tier_field: str | None = None
    answer_kind: AnswerKind = "math"
    answer_pattern: str | None = None


PRESETS = {
    "aime": Layout(),
    "aimo": Layout(),
    "world": Layout(id_field="id", tier_field="tier"),
    "dapo": Layout(
        problem_field="prompt",
        answer_field="reward_model.ground_truth",
        id_field="extra_info.index",
        answer_pattern=r"Answer:\s*([^\n]+)",  # DAPO's prompts ask for "Answer: …"; a \boxed{} still wins
    ),
}


def _get(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def _problem_text(value: Any) -> str:
    """A plain string, or the content of the last user turn of a chat-format prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise ValueError(f"cannot read a problem from {type(value).__name__}")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), 1)
        return
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc


def load_problems(path: str | Path, layout: str | Layout = "aime", tier: int = 0) -> list[Problem]:
    """Every record as a Problem; a record missing a field is an error naming the file and line."""
    path = Path(path)
    if isinstance(layout, str) and layout not in PRESETS:
        raise ValueError(f"unknown data layout {layout!r}: one of {sorted(PRESETS)}, or give the fields")
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: expected a .jsonl or .parquet file")
    spec = PRESETS[layout] if isinstance(layout, str) else layout
    problems = []
    for where, record in _records(path):
        try:
            problem = _problem_text(_get(record, spec.problem_field))
            answer = str(_get(record, spec.answer_field))
            pid = str(_get(record, spec.id_field)) if spec.id_field else f"{path.stem}-{where}"
            level = int(_get(record, spec.tier_field)) if spec.tier_field else tier
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}:{where}: missing or unreadable field {exc}") from exc
        problems.append(Problem(pid, problem, answer, level, spec.answer_kind, spec.answer_pattern))
    if not problems:
        raise ValueError(f"{path}: no records")
    return problems


def load_split(cfg: EAPOConfig, split: Literal["train", "eval"]) -> list[Problem]:
    """The problems of ``data.<split>``: its file (the tiny world's split by default) in its layout, with
    the fields the config overrides."""
    source = getattr(cfg.data, split)
    overrides = {
        name: value
        for name in ("problem_field", "answer_field", "id_field", "answer_kind", "answer_pattern")
        if (value := getattr(source, name)) is not None
    }
    return load_problems(cfg.data_path(split), replace(PRESETS[source.layout], **overrides))
