"""One EAPO episode: the multi-turn loop of policy turns, consult blocks and injected expert answers.

Token-in, token-out: sampled ids and their behaviour log-probs are appended exactly as sampled;
only injected text (expert blocks) is tokenized, with loss mask 0. Each answer returned for a query
is shown to the policy only if the episode's seeded draw ``u < p(t)``; the draw and the decision
are recorded either way.

Any tokenizer: prompts come from the policy's own chat template (``proto.episode_format``), a consult
turn ends on the closing tag as a stop *string* (``eapo.inference.sampling``: under BPE the tag is several tokens,
and its last may run past it), and expert blocks continue the same assistant turn as plain text.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import numpy as np
from transformers import PreTrainedTokenizerFast

from eapo.core.config import EAPOConfig, RolloutConfig
from eapo.core.metrics import labelled
from eapo.inference.sampling import SampleRequest
from proto import (
    AnnealState,
    ConsultRecord,
    ConsultRequest,
    ConsultResponse,
    ConsultResult,
    PromptTask,
    Trajectory,
    TurnRecord,
)
from proto import episode_format as fmt
from rollout_service.consult import parse_consult
from rollout_service.engine import PolicyEngine
from rollout_service.metrics import CONSULTS, EPISODES, PARSE_ISSUES
from rollout_service.reward import extract_answer, judge

log = logging.getLogger(__name__)


def episode_seed(base: int, prompt_id: str, sample_index: int) -> int:
    """Stable across processes and replicas (unlike ``hash``), so an episode can be replayed."""
    digest = hashlib.sha256(f"{base}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


@functools.lru_cache(maxsize=256)  # a replica's groups in flight share prompts; past them a miss costs one render
def prompt_ids(tok: PreTrainedTokenizerFast, problem: str, max_queries: int | None) -> tuple[int, ...]:
    """The prompt under the policy's own chat template: the training prompt (the consult instruction
    with K = ``max_queries``) or, with None, the minimal evaluation prompt. The template writes any BOS
    itself, so no special tokens are added (as vLLM's chat endpoint does). Cached: a group's G episodes
    share a prompt, and rendering a template costs more than the encoding."""
    messages = fmt.eval_messages(problem) if max_queries is None else fmt.training_messages(problem, max_queries)
    return tuple(tok.backend_tokenizer.encode(fmt.render_prompt(tok, messages), add_special_tokens=False).ids)


def gateway_session(cfg: EAPOConfig) -> aiohttp.ClientSession:
    """One connection pool to the gateway (no connection cap), with the data-plane token when set."""
    token = cfg.gateway.api_token
    auth = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=auth)


@dataclass
class ExpertClient:
    """Sends one consult block to the gateway, one batch per expert pool; failures become per-query
    errors. With several pools (``model.experts``) query i goes to pool i mod n, all in parallel."""

    session: aiohttp.ClientSession
    url: str
    model: str | list[str]
    max_tokens: int
    timeout_s: float

    @classmethod
    def for_rollout(cls, session: aiohttp.ClientSession, cfg: EAPOConfig) -> ExpertClient:
        rc = cfg.rollout
        return cls(session, rc.gateway_url.rstrip("/"), cfg.model.experts, rc.expert_max_tokens, rc.expert_timeout_s)

    async def consult(self, queries: list[str], episode_id: str) -> list[ConsultResult]:
        pools = [self.model] if isinstance(self.model, str) else self.model
        if len(pools) == 1 or len(queries) == 1:
            return await self._ask(pools[0], queries, episode_id)
        shares = {pool: list(range(i, len(queries), len(pools))) for i, pool in enumerate(pools[: len(queries)])}
        answers = await asyncio.gather(
            *(self._ask(pool, [queries[i] for i in idx], episode_id) for pool, idx in shares.items())
        )
        merged = {
            i: res.model_copy(update={"index": i})
            for idx, results in zip(shares.values(), answers, strict=True)
            for i, res in zip(idx, results, strict=True)
        }
        return [merged[i] for i in range(len(queries))]

    async def _ask(self, model: str, queries: list[str], episode_id: str) -> list[ConsultResult]:
        req = ConsultRequest(
            model=model,
            queries=queries,
            max_tokens=self.max_tokens,
            deadline_s=self.timeout_s,
            episode_id=episode_id,
        )
        try:
            async with self.session.post(
                f"{self.url}/v1/consult",
                data=req.model_dump_json(),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s + 5),
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"gateway HTTP {resp.status}: {text[:300]}")
                results = ConsultResponse.model_validate_json(text).results
        except Exception as exc:  # the expert is unavailable to this turn; the episode goes on
            log.warning("consult failed (%s): %s", type(exc).__name__, exc)
            return [ConsultResult(index=i, error=f"{type(exc).__name__}: {exc}") for i in range(len(queries))]
        if len(results) != len(queries):
            return [
                ConsultResult(index=i, error="gateway answered a different number of queries")
                for i in range(len(queries))
            ]
        return results


class Experts(Protocol):
    async def consult(self, queries: list[str], episode_id: str) -> list[ConsultResult]:
        """One answer or error per query, in order; never raises (a failure is that query's error)."""
        ...


@dataclass
class PolicyExperts:
    """Self-collaboration: the policy itself answers its consult queries, the way an expert server
    would (chat template, greedy, stop at EOS) — the "experts = replicas of the policy" baseline."""

    engine: PolicyEngine
    max_tokens: int

    async def consult(self, queries: list[str], episode_id: str) -> list[ConsultResult]:
        return list(await asyncio.gather(*(self._answer(i, q) for i, q in enumerate(queries))))

    async def _answer(self, index: int, query: str) -> ConsultResult:
        tok = self.engine.tokenizer
        t0 = time.perf_counter()
        request = SampleRequest(
            prompt_ids=list(prompt_ids(tok, query, None)),
            max_new_tokens=self.max_tokens,
            stop_ids=frozenset({tok.eos_token_id}),
            temperature=0.0,
        )
        result, _ = await self.engine.sample(request)
        answer = token_text(tok, result.token_ids, skip_special_tokens=True)
        return ConsultResult(index=index, answer=answer, latency_ms=(time.perf_counter() - t0) * 1000)


async def run_episode(
    engine: PolicyEngine,
    experts: Experts | None,
    task: PromptTask,
    anneal: AnnealState,
    cfg: RolloutConfig,
    sample_index: int,
) -> Trajectory:
    """Roll out one episode. ``experts=None`` means the consult action is not granted (eval prompt).

    The action is offered only where its answers can be read: at B(t) = 1 the episode is a plain answer
    under the evaluation prompt, and in the last turn of a larger budget a consult block does not end the
    turn (no expert is called; the policy's text goes on and is judged as written).
    """
    tok = engine.tokenizer
    seed = episode_seed(cfg.seed, task.prompt_id, sample_index)
    rng = random.Random(seed)
    eos = tok.eos_token_id
    if anneal.budget < 2:
        experts = None
    ids = list(prompt_ids(tok, task.problem, cfg.max_queries if experts else None))
    prompt_len = len(ids)
    mask = [False] * prompt_len
    logprobs = [0.0] * prompt_len
    turns: list[TurnRecord] = []
    consults: list[ConsultRecord] = []
    rejected_blocks = 0
    finish = "budget"
    for turn in range(anneal.budget):
        may_consult = experts is not None and turn < anneal.budget - 1
        room = cfg.max_context - len(ids)
        if room <= 0:
            finish = "context"
            break
        result, version = await engine.sample(
            SampleRequest(
                prompt_ids=list(ids),
                max_new_tokens=min(cfg.max_new_tokens, room),
                stop_ids=frozenset({eos}),
                stop_strings=(fmt.CONSULT_CLOSE,) if may_consult else (),
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=rng.getrandbits(63),
            )
        )
        start = len(ids)
        ids += result.token_ids
        mask += [True] * len(result.token_ids)
        logprobs += result.logprobs
        if may_consult and result.stop_string == fmt.CONSULT_CLOSE:
            turns.append(TurnRecord(start=start, end=len(ids), policy_version=version, finish="consult"))
            parsed = parse_consult(token_text(tok, result.token_ids), cfg.max_queries)
            for issue in parsed.issues:
                labelled(PARSE_ISSUES, issue).inc()
            if not parsed.queries:
                rejected_blocks += 1
                injected = token_ids(tok, fmt.expert_block(None))
                ids += injected
                mask += [False] * len(injected)
                logprobs += [0.0] * len(injected)
                continue
            answers = await experts.consult(parsed.queries, f"{task.prompt_id}/{sample_index}")
            for query, res in zip(parsed.queries, answers, strict=True):
                draw = rng.random()
                accepted = res.answer is not None and draw < anneal.acceptance
                injected = token_ids(tok, fmt.expert_block(res.answer if accepted else None))
                labelled(CONSULTS, "answer" if res.answer is not None else "error", str(accepted)).inc()
                consults.append(
                    ConsultRecord(
                        turn=len(turns) - 1,
                        query=query,
                        outcome="answer" if res.answer is not None else "error",
                        draw=draw,
                        accepted=accepted,
                        injected_start=len(ids),
                        injected_end=len(ids) + len(injected),
                        detail=(res.answer if res.answer is not None else res.error or "")[:1000],
                    )
                )
                ids += injected
                mask += [False] * len(injected)
                logprobs += [0.0] * len(injected)
            continue
        ended = "eos" if result.finish == "stop" else ("context" if len(ids) >= cfg.max_context else "length")
        turns.append(TurnRecord(start=start, end=len(ids), policy_version=version, finish=ended))
        finish = ended
        break
    final_text = token_text(tok, ids[turns[-1].start : turns[-1].end], skip_special_tokens=True) if turns else ""
    answer = extract_answer(final_text, task.answer_pattern) if turns and turns[-1].finish != "consult" else None
    if answer is not None and finish == "eos":
        finish = "answer"
    correct, f1 = judge(answer, task.answer, task.answer_kind)
    labelled(EPISODES, finish).inc()
    return Trajectory(
        sample_index=sample_index,
        token_ids=np.asarray(ids, dtype=np.int32),
        loss_mask=np.asarray(mask, dtype=bool),
        behaviour_logprobs=np.asarray(logprobs, dtype=np.float32),
        prompt_len=prompt_len,
        turns=turns,
        consults=consults,
        rejected_blocks=rejected_blocks,
        final_answer=answer,
        score=correct,
        f1=f1,
        finish=finish,
        seed=seed,
    )
