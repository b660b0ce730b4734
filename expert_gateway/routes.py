"""The gateway's HTTP routes, on two routers that ``create_app`` includes.

``v1`` is the data plane (behind the data-plane token, if one is set): ``/v1/models``; ``/v1/consult``,
which fans a batch of ≤K queries out in parallel and answers per query (partial success is normal);
and the two OpenAI pass-through routes, declared here for the OpenAPI schema only (``forward.Passthrough``
serves them). ``probes`` are open: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``. Handlers get
the gateway's state by dependency injection (``State``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from eapo.core.http import openai_error
from eapo.core.metrics import labelled
from expert_gateway.admin import LiveState
from expert_gateway.degrade import degrade
from expert_gateway.forward import PASSTHROUGH, REQUESTS, ClientGone, UpstreamFailed, call_pool, unless_disconnected
from expert_gateway.pools import NoBackend, QueueFull
from expert_gateway.security import REJECTED
from expert_gateway.state import GatewayState, State
from proto import ConsultRequest, ConsultResponse, ConsultResult

v1 = APIRouter(prefix="/v1")
probes = APIRouter()


class CompletionBody(BaseModel):
    """What the gateway reads of an OpenAI request; every other field passes through untouched."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="pool name or alias")
    stream: bool = Field(False, description="relay the backend's SSE stream chunk by chunk")
    max_tokens: int | None = Field(None, ge=1, description="refused with 422 above gateway.max_tokens_limit")
    messages: list[dict[str, Any]] | None = Field(None, description="chat completions")
    prompt: str | list[str] | None = Field(None, description="text completions")


OPENAI_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": CompletionBody.model_json_schema()}}},
    "responses": {"404": {"description": "unknown model"}, "429": {"description": "queue full; see Retry-After"},
                  "503": {"description": "no healthy backend, or all tried failed; see Retry-After"}},
}  # fmt: skip


async def served_by_passthrough() -> None:
    """Never called: ``GatewayApp.__call__`` hands these paths to ``forward.Passthrough`` first."""
    raise AssertionError("GatewayApp.__call__ serves the pass-through routes")


for _path, _doc in (
    ("/v1/chat/completions", "OpenAI chat completions, passed through to the model's pool"),
    ("/v1/completions", "OpenAI text completions, passed through to the model's pool"),
):
    v1.add_api_route(
        _path.removeprefix("/v1"),
        served_by_passthrough,
        methods=["POST"],
        openapi_extra=OPENAI_BODY,
        summary=_doc.split(",")[0],
        description=f"{_doc} (``stream: true`` relays SSE chunk by chunk).",
        operation_id=PASSTHROUGH[_path],
    )


@v1.get("/models")
async def models(state: State) -> dict[str, Any]:
    """The union of the pools, aliases included."""
    names = state.pools.models + sorted(state.pools.aliases)
    return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "eapo-gateway"} for m in names]}


@v1.post("/consult", response_model=ConsultResponse)
async def consult(req: ConsultRequest, request: Request, state: State) -> ConsultResponse | Response:
    """≤K queries of one policy turn, answered in parallel and in order; each answer or its error."""
    if len(req.queries) > state.config.max_queries:
        REJECTED.labels("too_many_queries").inc()
        return openai_error(413, f"{len(req.queries)} queries exceed the limit of {state.config.max_queries}")
    if req.max_tokens > state.config.max_tokens_limit:
        REJECTED.labels("max_tokens").inc()
        limit = state.config.max_tokens_limit
        return openai_error(422, f"max_tokens={req.max_tokens} exceeds this gateway's limit of {limit}")
    try:
        model = state.pools.pool(req.model).model
    except NoBackend as exc:
        REJECTED.labels("unknown_model").inc()
        return openai_error(404, str(exc), "NotFoundError")
    deadline = time.monotonic() + min(req.deadline_s, state.config.request_timeout_s)
    slots = req.slots or list(range(len(req.queries)))
    asks = enumerate(zip(slots, req.queries, strict=True))
    work = asyncio.gather(*(consult_one(state, req, model, i, slot, q, deadline) for i, (slot, q) in asks))
    try:
        results = await unless_disconnected(request.receive, work)
    except ClientGone:
        labelled(REQUESTS, "consult", "client_disconnected").inc()
        return Response(status_code=499)
    labelled(REQUESTS, "consult", "ok").inc()
    return ConsultResponse(model=req.model, results=list(results))


async def consult_one(
    state: GatewayState, req: ConsultRequest, model: str, index: int, slot: int, query: str, deadline: float
) -> ConsultResult:
    """One query of a consult batch (``index`` in the request, ``slot`` in its consult block) as a chat
    completion on the pool; its answer, or why there is none."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": query}],
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
    ).encode()
    # Stickiness per (episode, query slot): the K queries of a turn still spread over the pool.
    episode = None if req.episode_id is None else f"{req.episode_id}:{slot}"

    async def ask() -> str:
        status, payload, _ = await call_pool(state, model, "v1/chat/completions", body, deadline, episode)
        if status != 200:
            raise UpstreamFailed(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
        return json.loads(payload)["choices"][0]["message"]["content"]

    t0 = time.perf_counter()
    try:
        cache = state.answer_cache
        if cache is not None and req.temperature == 0:
            answer = await cache.answer((model, query, req.max_tokens), ask)
        else:
            answer = await ask()
        if (setting := state.config.degrade.get(model)) is not None:
            answer = degrade(setting, model, answer, state.config.seed, f"{req.episode_id}:{slot}:{query}")
        return ConsultResult(index=index, answer=answer, latency_ms=(time.perf_counter() - t0) * 1000)
    except (UpstreamFailed, NoBackend, QueueFull, ValueError, KeyError, IndexError, TypeError) as exc:
        return ConsultResult(
            index=index, error=str(exc) or type(exc).__name__, latency_ms=(time.perf_counter() - t0) * 1000
        )


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Readiness: at least one backend is available."""
    now = time.monotonic()
    ready = any(b.available(now) for b in state.pools.backends())
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@probes.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus text format: the process's counters and every backend's and pool's live state."""
    return Response(generate_latest() + generate_latest(LiveState(state)), media_type=CONTENT_TYPE_LATEST)
