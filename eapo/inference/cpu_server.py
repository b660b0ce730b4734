"""``eapo expert-server``: a CPU OpenAI-compatible server, the stand-in for vLLM expert pods.

It speaks the subset of vLLM's API that the gateway and rollout use — ``/v1/completions``,
``/v1/chat/completions`` (both with SSE streaming), ``/v1/models``, ``/health`` — with temperature,
top-p, max_tokens, stop strings, seed and log-probs, plus what a remote policy server needs:
token-id prompts, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``return_tokens_as_token_ids`` and (with
``VLLM_SERVER_DEV_MODE=1``) ``POST /collective_rpc`` running the worker extension's methods
(``eapo_load_weights(path)``; ``eapo_join_broadcast``/``eapo_receive_broadcast``). Concurrent
requests share batched forward passes (``eapo.inference.sampling.Batcher``).

Stop strings behave as in vLLM: generation ends at the first token whose decoded text completes one;
the returned token ids and log-probs include that token, the text is cut at the string (after it with
``include_stop_str_in_output``), and the choice's ``stop_reason`` names it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from eapo.core.answer_cache import AnswerCache
from eapo.core.config import ExpertServerConfig
from eapo.core.http import openai_error
from eapo.inference.model import load_model, with_weights
from eapo.inference.sampling import Batcher, SampleRequest, SampleResult
from proto.broadcast import Backend, Group, join, receive
from proto.weights import MANIFEST, WeightsError, read_manifest, verify_version


class SamplingFields(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = Field(False, description="vLLM extra: the text keeps the stop string")
    skip_special_tokens: bool = Field(True, description="vLLM extra: special tokens left out of the text")
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(description="text, or token ids (token-in, as vLLM accepts)")
    logprobs: int | None = Field(None, ge=0, le=5)
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra: stop after any of these ids")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM extra: log-prob tokens as 'token_id:N'")


class CollectiveRpc(BaseModel):
    """vLLM's dev-mode ``POST /collective_rpc``: call ``method`` on every worker."""

    method: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


class ServedModel:
    """The checkpoint at ``path`` served as ``cfg.model``: the model, its tokenizer, the batcher feeding it
    and, with ``cfg.answer_cache`` > 0, its greedy completions, shared read-only."""

    def __init__(self, cfg: ExpertServerConfig, path: Path):
        self.name = cfg.model
        # Greedy completions by (prompt ids, max tokens, stops): a function of those on these weights.
        self.answers: AnswerCache[tuple, SampleResult] | None = (
            AnswerCache(cfg.answer_cache, log_every=1000) if cfg.answer_cache else None
        )
        model, self.tokenizer = load_model(path)
        version = read_manifest(path).version if (path / MANIFEST).exists() else -1  # a published version?
        self.batcher = Batcher(model, self.tokenizer.pad_token_id, cfg.max_batch, version, self.tokenizer)
        self.group: Group | None = None
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._rng = random.Random(cfg.seed)

    async def load_weights(self, path: str) -> int:
        """``eapo_load_weights``: a published version from storage, checksums verified; nothing to do
        when it is the version held (the learner may have broadcast it already)."""
        try:
            if read_manifest(Path(path)).version == self.batcher.version:
                return self.batcher.version
            manifest = await asyncio.to_thread(verify_version, Path(path))
        except (OSError, WeightsError) as exc:
            raise WeightsError(f"cannot load weights from {path}: {exc}") from exc
        model, _ = await asyncio.to_thread(load_model, Path(path))
        self._swap(model, manifest.version)
        return manifest.version

    async def join_broadcast(
        self, address: str, rank: int, world_size: int, backend: Backend = "gloo", timeout_s: float = 300.0
    ) -> None:
        """``eapo_join_broadcast``: become ``rank`` of the learner's weight group (``proto.broadcast``)."""
        self.group = await asyncio.to_thread(join, address, rank, world_size, backend, timeout_s)

    async def receive_broadcast(self) -> int:
        """``eapo_receive_broadcast``: take the version the learner is broadcasting now."""
        if self.group is None:
            raise RuntimeError("eapo_receive_broadcast before eapo_join_broadcast")
        version, tensors = await asyncio.to_thread(receive, self.group)
        model = await asyncio.to_thread(with_weights, self.batcher.model, tensors)
        self._swap(model, version)
        return version

    async def complete(
        self, prompt_ids: list[int], body: SamplingFields, max_tokens: int, stop_ids: frozenset[int] = frozenset()
    ) -> tuple[SampleResult, str, str | int | None]:
        """The sample, its text and vLLM's ``stop_reason`` (the stop string, a stop id other than EOS, or
        None)."""
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a {self.max_context}-token context")
        request = SampleRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=min(max_tokens, room),
            stop_ids=frozenset({self.tokenizer.eos_token_id}) | stop_ids,
            stop_strings=tuple(s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed if body.seed is not None else self._rng.getrandbits(63),
        )
        if self.answers is not None and request.temperature == 0:
            key = (tuple(prompt_ids), request.max_new_tokens, request.stop_ids, request.stop_strings)
            result = await self.answers.answer(key, lambda: self._sample(request))
        else:
            result = await self._sample(request)
        stop_reason: str | int | None = result.stop_string
        if result.finish == "stop" and stop_reason is None and result.token_ids[-1] != self.tokenizer.eos_token_id:
            stop_reason = result.token_ids[-1]
        return result, completion_text(result, self.tokenizer, body), stop_reason

    async def _sample(self, request: SampleRequest) -> SampleResult:
        return (await self.batcher.sample(request))[0]

    def _swap(self, model: Any, version: int) -> None:
        """New weights: sampled from once the running rows finish; no answer of the old ones is kept."""
        self.batcher.set_model(model, version)
        if self.answers is not None:
            self.answers.clear()


def completion_text(result: SampleResult, tokenizer: Any, body: SamplingFields) -> str:
    """The completion's text as vLLM returns it: without the EOS that ended it, cut at the stop string
    that did (kept with ``include_stop_str_in_output``; what a token ran past it is cut either way)."""
    ids = result.token_ids
    if ids and result.finish == "stop" and result.stop_string is None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens)
    if result.stop_string is not None and (cut := text.find(result.stop_string)) >= 0:
        text = text[: cut + (len(result.stop_string) if body.include_stop_str_in_output else 0)]
    return text


def served_model(request: Request) -> ServedModel:
    return request.app.state.served


Served = Annotated[ServedModel, Depends(served_model)]


RPC = {  # collective_rpc method → what it runs (as eapo.inference.vllm_worker names them)
    "eapo_load_weights": ServedModel.load_weights,
    "eapo_join_broadcast": ServedModel.join_broadcast,
    "eapo_receive_broadcast": ServedModel.receive_broadcast,
}


def create_app(cfg: ExpertServerConfig, path: Path) -> FastAPI:
    """The server of the checkpoint at ``path`` (``cfg.model_path`` or the world's, resolved by the caller)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.served = ServedModel(cfg, path)
        yield
        await app.state.served.batcher.close()

    app = FastAPI(title="eapo expert server (CPU, OpenAI-compatible)", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return openai_error(400, f"invalid request: {exc.errors()}")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    if os.environ.get("VLLM_SERVER_DEV_MODE") == "1":  # as vLLM: weight updates only in dev mode

        @app.post("/collective_rpc", response_model=None)
        async def collective_rpc(body: CollectiveRpc, m: Served) -> Response | dict:
            """What ``eapo.inference.vllm_worker.EAPOWorkerExtension`` does inside vLLM's workers."""
            method = RPC.get(body.method)
            if method is None:
                return openai_error(400, f"unsupported collective_rpc {body.method!r}: one of {sorted(RPC)}")
            try:
                result = await method(m, *body.args, **body.kwargs)
            except TypeError as exc:
                return openai_error(400, f"bad arguments for {body.method}: {exc}")
            except (OSError, ValueError, RuntimeError) as exc:  # WeightsError, a failed join or receive
                return openai_error(400, f"{body.method} failed: {exc}")
            return {"results": [result]}

    @app.get("/v1/models")
    async def models(m: Served) -> dict:
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "eapo"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, m: Served) -> Response | dict:
        ids = m.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        if any(not 0 <= i < len(m.tokenizer) for i in ids):
            return openai_error(400, f"prompt token ids must lie in [0, {len(m.tokenizer)})")
        outcome = await _generate(m, body, ids, body.max_tokens or 16, frozenset(body.stop_token_ids or ()))
        if isinstance(outcome, Response):
            return outcome
        result, text, stop_reason = outcome
        logprobs = None
        if body.logprobs is not None:
            tokens = (
                [f"token_id:{i}" for i in result.token_ids]
                if body.return_tokens_as_token_ids
                else m.tokenizer.convert_ids_to_tokens(result.token_ids)
            )
            logprobs = {"tokens": tokens, "token_logprobs": result.logprobs, "top_logprobs": None, "text_offset": None}
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": result.finish,
            "stop_reason": stop_reason,
        }
        return _respond(m, body, len(ids), result, choice, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, m: Served) -> Response | dict:
        messages = [msg.model_dump() for msg in body.messages]
        ids = m.tokenizer.encode(m.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        outcome = await _generate(m, body, ids, body.max_completion_tokens or body.max_tokens or 256)
        if isinstance(outcome, Response):
            return outcome
        result, text, stop_reason = outcome
        logprobs = None
        if body.logprobs:
            tokens = m.tokenizer.convert_ids_to_tokens(result.token_ids)
            logprobs = {
                "content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                    for t, lp in zip(tokens, result.logprobs, strict=True)
                ]
            }
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": result.finish,
            "stop_reason": stop_reason,
        }
        return _respond(m, body, len(ids), result, choice, chat=True)

    return app


async def _generate(
    m: ServedModel, body: SamplingFields, ids: list[int], max_tokens: int, stop_ids: frozenset[int] = frozenset()
) -> tuple[SampleResult, str, str | int | None] | Response:
    if body.model != m.name:
        return openai_error(404, f"The model `{body.model}` does not exist.", "NotFoundError")
    try:
        return await m.complete(ids, body, max_tokens, stop_ids)
    except ValueError as exc:
        return openai_error(400, str(exc))


def _respond(
    m: ServedModel, body: SamplingFields, prompt_tokens: int, result: SampleResult, choice: dict, chat: bool
) -> Response | dict:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return _sse(rid, "chat.completion.chunk" if chat else "text_completion", created, m.name, choice, chat)
    completion = len(result.token_ids)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": m.name,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
    }


def _sse(rid: str, obj: str, created: int, model: str, choice: dict, chat: bool) -> StreamingResponse:
    """Stream the finished text in a few chunks, then the finish reason and ``[DONE]``, as vLLM frames it."""
    text = choice["message"]["content"] if chat else choice["text"]
    pieces = [text[i : i + 8] for i in range(0, len(text), 8)] or [""]

    def chunk(piece: str | None, finish: str | None) -> str:
        if chat:
            delta = {"role": "assistant", "content": piece} if piece is not None else {}
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return (
            "data: "
            + json.dumps({"id": rid, "object": obj, "created": created, "model": model, "choices": [c]})
            + "\n\n"
        )

    async def events() -> AsyncIterator[str]:
        for piece in pieces:
            yield chunk(piece, None)
        yield chunk(None, choice["finish_reason"])
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
