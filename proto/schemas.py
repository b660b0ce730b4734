"""Message schemas for everything that crosses a process boundary.

Pydantic models, validated on every read. Token arrays are numpy arrays (packed on the wire by
``proto.codec``), never lists of ints. Bump ``SCHEMA_VERSION`` on any incompatible change: readers
reject versions they do not know with ``SchemaVersionError``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 3  # 2: PromptTask.answer_kind/answer_pattern, Trajectory.f1; 3: Trajectory.work_holds


def _array(dtype: str) -> BeforeValidator:
    want = np.dtype(dtype)

    def convert(value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray) and value.ndim == 1 and np.can_cast(value.dtype, want, "safe"):
            return value  # exact already, or losslessly narrower (the codec's uint16 token ids): no copy
        arr = np.asarray(value)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-D array, got shape {arr.shape}")
        if arr.size and not np.can_cast(arr.dtype, dtype, casting="same_kind"):
            raise ValueError(f"expected {dtype}-compatible values, got {arr.dtype}")
        return arr.astype(dtype, copy=False)

    return BeforeValidator(convert)


TokenIds = Annotated[np.ndarray, _array("int32")]  # int32, or a narrower integer type that fits
Mask = Annotated[np.ndarray, _array("bool")]
Floats = Annotated[np.ndarray, _array("float32")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


# --- Consultation (HTTP JSON between rollout and gateway) -------------------------------------------


class ConsultRequest(Message):
    """A batch of ≤K queries from one policy turn, fanned out in parallel by the gateway."""

    schema_version: Literal[1] = 1
    model: str = Field(description="expert pool name")
    queries: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    deadline_s: float = Field(30.0, gt=0.0, le=600.0, description="overall deadline for the batch")
    episode_id: str | None = Field(None, description="routing hint: later turns may stick to a backend")
    slots: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="each query's place in its consult block, which keys stickiness and degrade draws; default "
        "0, 1, …; a client that sends only some of a block's queries (or splits a block over pools) sends them",
    )

    @model_validator(mode="after")
    def _a_slot_per_query(self) -> ConsultRequest:
        if self.slots is not None and len(self.slots) != len(self.queries):
            raise ValueError(f"{len(self.slots)} slots for {len(self.queries)} queries")
        return self


class ConsultResult(Message):
    """The answer to one query, or why there is none. Partial success is a normal response."""

    index: int
    answer: str | None = None
    error: str | None = None
    backend: str | None = None
    latency_ms: float = 0.0

    @model_validator(mode="after")
    def _one_of(self) -> ConsultResult:
        if (self.answer is None) == (self.error is None):
            raise ValueError("exactly one of answer and error must be set")
        return self


class ConsultResponse(Message):
    schema_version: Literal[1] = 1
    model: str
    results: list[ConsultResult]


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, NotFoundError, RateLimitError, ServiceUnavailable, …")
    code: int = Field(description="the HTTP status")


class ErrorBody(BaseModel):
    """OpenAI's error body, ``{"error": {"message", "type", "code"}}``: every refusal of the gateway and of
    the CPU expert server has it, as vLLM's and OpenAI's do, so a client reads all of them one way."""

    error: ErrorDetail


# --- Prompts stream (learner/feeder → rollout) ---------------------------------------------------------


AnswerKind = Literal["math", "short"]


class PromptTask(Message):
    """One prompt to roll out as a group of G episodes."""

    prompt_id: str
    problem: str
    answer: str
    tier: int = 0
    admitted_at_step: int = Field(0, description="learner step when the feed admitted this prompt")
    answer_kind: AnswerKind = Field(
        "math", description="math: equivalence by math-verify; short: normalised exact match, plus token F1"
    )
    answer_pattern: str | None = Field(
        None,
        description="the task's own answer format, used when the text has no \\boxed{}: a regular "
        "expression whose first group is the answer (its last match counts), e.g. '#### (.+)'",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _one_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise ValueError(f"answer_pattern {pattern!r} is not a regular expression: {exc}") from None
        if groups < 1:
            raise ValueError(f"answer_pattern {pattern!r} needs a group around the answer, e.g. 'Answer: (.+)'")
        return pattern


# --- Trajectories (rollout → learner) ------------------------------------------------------------------


class AnnealState(Message):
    """p(t), B(t), λ(t): a pure function of the learner step, published by the learner every step."""

    step: int = Field(ge=0)
    acceptance: float = Field(ge=0.0, le=1.0)
    budget: int = Field(ge=1)
    penalty: float = Field(ge=0.0)


class TurnRecord(Message):
    """One policy generation call: tokens [start, end) of the sequence were sampled by ``version``."""

    start: int
    end: int
    policy_version: int
    finish: Literal["consult", "eos", "length", "context"]


DETAIL_CHARS = 1000  # what a ConsultRecord keeps of an answer or error: enough to read it, not to re-read it


class ConsultRecord(Message):
    """One query of a consult block and what became of it. ``draw`` < p means an expert was asked, and
    its answer, if one came, shown (``accepted``); otherwise no expert was asked (``not_asked``)."""

    turn: int
    query: str
    outcome: Literal["answer", "error", "not_asked"]
    draw: float
    accepted: bool
    injected_start: int
    injected_end: int
    detail: str = Field("", description=f"the expert's answer or error text, cut at {DETAIL_CHARS} characters")

    @field_validator("detail")
    @classmethod
    def _cut(cls, text: str) -> str:
        """The stream carries a record per query; the shown tokens (``injected_start:end``) hold it whole."""
        return text[:DETAIL_CHARS]


class Trajectory(Message):
    """One episode. ``loss_mask`` is 1 exactly on policy-sampled tokens; prompt and injected text are 0."""

    sample_index: int
    token_ids: TokenIds
    loss_mask: Mask
    behaviour_logprobs: Floats
    prompt_len: int
    turns: list[TurnRecord]
    consults: list[ConsultRecord] = Field(default_factory=list)
    rejected_blocks: int = Field(0, description="malformed consult blocks (counted, not executed)")
    final_answer: str | None = None
    score: float = Field(ge=0.0, le=1.0, description="correctness against the verified answer")
    f1: float | None = Field(None, ge=0.0, le=1.0, description="token F1 against the answer (short answers)")
    work_holds: bool | None = Field(
        None, description="every integer equation in the answer's turn holds; None: it writes none (reward.work_holds)"
    )
    finish: Literal["answer", "eos", "budget", "length", "context"]
    seed: int

    @model_validator(mode="after")
    def _aligned(self) -> Trajectory:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"token_ids ({n}), loss_mask ({len(self.loss_mask)}) and behaviour_logprobs "
                f"({len(self.behaviour_logprobs)}) must have equal length"
            )
        if not 0 < self.prompt_len <= n:
            raise ValueError(f"prompt_len {self.prompt_len} outside (0, {n}]")
        if self.loss_mask[: self.prompt_len].any():
            raise ValueError("prompt tokens must have loss mask 0")
        return self

    @property
    def policy_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def accepted_consults(self) -> int:
        return sum(c.accepted for c in self.consults)


class TrajectoryGroup(Message):
    """The G episodes of one prompt: the unit of group-relative advantage."""

    group_id: str
    prompt: PromptTask
    anneal: AnnealState
    samples: list[Trajectory] = Field(min_length=1)
    rollout_replica: str
    created_at: float

    @property
    def min_policy_version(self) -> int:
        return min((t.policy_version for s in self.samples for t in s.turns), default=0)


# --- Weights (learner → rollout) -----------------------------------------------------------------------


class WeightManifest(Message):
    """Written last into a version directory; ``files`` maps each file to its sha256."""

    version: int = Field(ge=0)
    step: int = Field(ge=0)
    created_at: float
    files: dict[str, str]
