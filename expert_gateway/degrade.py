"""The paper's robustness settings (Appendix E) as a way of serving a pool: high-error experts, whose
answers are made wrong at a stated rate, and content-free experts, whose answers are fluent and carry
no information. One more, ours: result-withheld experts, whose answers stop just before they state their
result, so a consult gives the steps and the policy must still work out where they lead in its own
tokens (what it then has to do alone).

The gateway applies them to a pool's ``/v1/consult`` answers (``gateway.degrade``), so the same setting
runs in front of real vLLM pods as in front of the tiny world's CPU servers. Each decision is a seeded
function of (seed, episode, query slot, query): a run replays exactly, and the rate holds per query.
"""

from __future__ import annotations

import hashlib
import random
import re

from prometheus_client import Counter

from eapo.core.config import DegradeConfig
from eapo.core.metrics import labelled

DEGRADED = Counter(
    "eapo_gateway_degraded_total",
    "Consult answers degraded on purpose (Appendix E settings); outcome 'unchanged': nothing to corrupt or withhold",
    ["model", "mode", "outcome"],
)

CONTENT_FREE = (
    "Let me think about this carefully and check each step before I answer.",
    "This can be worked out step by step; the result follows from the problem itself.",
    "A careful reading of the question shows how to proceed from here.",
)
_INTEGER = re.compile(r"-?\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def corrupt(answer: str, rng: random.Random) -> str | None:
    """``answer`` with its result made wrong: the last integer of its last ``\\boxed{}`` (else of the whole
    text) shifted by a nonzero offset, everything else kept. None if there is no integer to shift."""
    boxes = list(_BOXED.finditer(answer))
    lo, hi = (boxes[-1].start(1), boxes[-1].end(1)) if boxes else (0, len(answer))
    numbers = list(_INTEGER.finditer(answer, lo, hi))
    if not numbers:
        return None
    last = numbers[-1]
    wrong = int(last.group()) + rng.choice([-1, 1]) * rng.randint(1, 9)
    return f"{answer[: last.start()]}{wrong}{answer[last.end() :]}"


def withhold_result(answer: str) -> str | None:
    """``answer`` cut just before it first states its result, the value of its last ``\\boxed{}``: at the
    first ``=<result>`` (keeping the ``=``), else at its first box. ``45*3=135 23+135=158 \\boxed{158}``
    becomes ``45*3=135 23+135=``. The first statement, not the last step: where an intermediate equals the
    result, a hint showing it would show the result. None if there is no result to withhold."""
    boxes = list(_BOXED.finditer(answer))
    result = boxes[-1].group(1).strip() if boxes else ""
    if not result:
        return None
    stated = re.search(rf"=\s*{re.escape(result)}(?!\.?\d)", answer[: boxes[0].start()])
    return answer[: stated.start() + 1 if stated else boxes[0].start()].rstrip()


def degrade(cfg: DegradeConfig, model: str, answer: str, seed: int, key: str) -> str:
    """The answer the policy is given for the query identified by ``key`` under the pool's setting."""
    rng = random.Random(hashlib.sha256(f"{seed}:{key}".encode()).digest())
    if rng.random() >= cfg.rate:
        return answer
    if cfg.mode == "content_free":
        labelled(DEGRADED, model, cfg.mode, "degraded").inc()
        return rng.choice(CONTENT_FREE)
    changed = corrupt(answer, rng) if cfg.mode == "high_error" else withhold_result(answer)
    labelled(DEGRADED, model, cfg.mode, "unchanged" if changed is None else "degraded").inc()
    return answer if changed is None else changed
