"""Who answers an episode's consult queries: the expert gateway over HTTP, or the policy itself.

Either way a failure is that query's error, never an exception: the experts are then unavailable to
the turn, and the episode goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from eapo.core.config import EAPOConfig
from eapo.inference.model import prompt_ids
from eapo.inference.sampling import SampleRequest
from proto import ConsultRequest, ConsultResponse, ConsultResult
from rollout_service.engine import PolicyEngine
from rollout_service.transcript import token_text

log = logging.getLogger(__name__)


class Experts(Protocol):
    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None) -> list[ConsultResult]:
        """One answer or error per query, in order; never raises (a failure is that query's error).
        ``slots``: the queries' places in their consult block (default 0, 1, …), which route them."""
        ...


def gateway_session(cfg: EAPOConfig) -> aiohttp.ClientSession:
    """One connection pool to the gateway (no connection cap), with the data-plane token when set."""
    token = cfg.gateway.api_token
    auth = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=auth)


@dataclass
class ExpertClient:
    """Sends one consult block to the gateway, one batch per expert pool; failures become per-query
    errors. With several pools (``model.experts``) the query in slot i of its block goes to pool i mod n,
    all in parallel."""

    session: aiohttp.ClientSession
    url: str
    model: str | list[str]
    max_tokens: int
    timeout_s: float

    @classmethod
    def for_rollout(cls, session: aiohttp.ClientSession, cfg: EAPOConfig) -> ExpertClient:
        rc = cfg.rollout
        return cls(session, rc.gateway_url.rstrip("/"), cfg.model.experts, rc.expert_max_tokens, rc.expert_timeout_s)

    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None) -> list[ConsultResult]:
        pools = [self.model] if isinstance(self.model, str) else self.model
        slots = list(range(len(queries))) if slots is None else slots
        shares: dict[str, list[int]] = {}  # pool → the queries it answers (their indices in ``queries``)
        for i, slot in enumerate(slots):
            shares.setdefault(pools[slot % len(pools)], []).append(i)
        if len(shares) == 1:  # one pool answers all, in order: its indices are already the queries'
            return await self._ask(next(iter(shares)), queries, episode_id, slots)
        answers = await asyncio.gather(
            *(
                self._ask(pool, [queries[i] for i in idx], episode_id, [slots[i] for i in idx])
                for pool, idx in shares.items()
            )
        )
        merged = {
            i: res.model_copy(update={"index": i})
            for idx, results in zip(shares.values(), answers, strict=True)
            for i, res in zip(idx, results, strict=True)
        }
        return [merged[i] for i in range(len(queries))]

    async def _ask(self, model: str, queries: list[str], episode_id: str, slots: list[int]) -> list[ConsultResult]:
        req = ConsultRequest(
            model=model,
            queries=queries,
            slots=slots,
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


@dataclass
class PolicyExperts:
    """Self-collaboration: the policy itself answers its consult queries, the way an expert server
    would (chat template, greedy, stop at EOS) — the "experts = replicas of the policy" baseline."""

    engine: PolicyEngine
    max_tokens: int

    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None) -> list[ConsultResult]:
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
