"""The token sequence of one episode: ids, loss mask, behaviour log-probs and turns, kept aligned.

Token-in, token-out: sampled ids and their log-probs are appended exactly as sampled (mask 1); only
text the policy did not write (the prompt, expert blocks) is tokenized, with mask 0 and log-prob 0.
The parallel lists grow only through ``Transcript``, so they cannot drift apart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerFast

from eapo.inference.model import prompt_ids
from eapo.inference.sampling import SampleResult
from proto import TurnRecord

TurnFinish = Literal["consult", "eos", "length", "context"]  # ``TurnRecord.finish``


def token_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of injected text, straight from the Rust tokenizer (the ``transformers`` wrapper costs 60–120 µs
    a call); never special tokens such as a BOS."""
    return list(_encoded(tok, text))


@functools.lru_cache(maxsize=1024)
def _encoded(tok: PreTrainedTokenizerFast, text: str) -> tuple[int, ...]:
    """Texts repeat within a group: the unavailable note and a greedy expert's answers recur. Encoding is
    deterministic, so a cache is exact; recent texts are enough."""
    return tuple(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def token_text(tok: PreTrainedTokenizerFast, ids: list[int], skip_special_tokens: bool = False) -> str:
    """The text of ``ids``, straight from the Rust tokenizer (the wrapper re-walks the list in Python)."""
    return tok.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass(slots=True)
class Transcript:
    """One episode's sequence so far. ``turns`` records which policy version sampled each span."""

    tokenizer: PreTrainedTokenizerFast
    ids: list[int]
    mask: list[bool]
    logprobs: list[float]
    prompt_len: int
    turns: list[TurnRecord] = field(default_factory=list)

    @classmethod
    def for_prompt(cls, tok: PreTrainedTokenizerFast, problem: str, max_queries: int | None) -> Transcript:
        """Starts from ``prompt_ids`` (the training prompt, or with None the evaluation prompt)."""
        ids = list(prompt_ids(tok, problem, max_queries))
        return cls(tok, ids, [False] * len(ids), [0.0] * len(ids), len(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def add_turn(self, sampled: SampleResult, version: int, finish: TurnFinish) -> TurnRecord:
        """Appends one policy turn exactly as ``version`` sampled it: trained on, with its log-probs."""
        start = len(self.ids)
        self.ids += sampled.token_ids
        self.mask += [True] * len(sampled.token_ids)
        self.logprobs += sampled.logprobs
        turn = TurnRecord(start=start, end=len(self.ids), policy_version=version, finish=finish)
        self.turns.append(turn)
        return turn

    def inject(self, text: str) -> tuple[int, int]:
        """Appends text the policy only reads (never trained on); returns its span [start, end)."""
        injected = token_ids(self.tokenizer, text)
        start = len(self.ids)
        self.ids += injected
        self.mask += [False] * len(injected)
        self.logprobs += [0.0] * len(injected)
        return start, len(self.ids)

    def text(self, turn: TurnRecord, skip_special_tokens: bool = False) -> str:
        return token_text(self.tokenizer, self.ids[turn.start : turn.end], skip_special_tokens)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, loss mask and behaviour log-probs in the dtypes of ``proto.Trajectory``."""
        return (
            np.asarray(self.ids, dtype=np.int32),
            np.asarray(self.mask, dtype=bool),
            np.asarray(self.logprobs, dtype=np.float32),
        )
