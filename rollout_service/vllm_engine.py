"""The policy in this process on vLLM's ``AsyncLLM`` (GPU): ``rollout.engine: vllm``.

Token-in, token-out: the prompt goes in as ids (``TokensPrompt``) and each turn comes back as the
sampled ids with their log-probs (``logprobs=0``: the sampled token's own), so nothing is re-tokenized.
vLLM batches the concurrent episodes' turns itself (continuous batching).

New weight versions load from shared storage inside vLLM's workers: ``collective_rpc`` calls
``eapo_load_weights(path)`` of ``eapo.inference.vllm_worker.EAPOWorkerExtension``. A load first stops
new turns here and lets the turns in flight finish on the old weights; only then does it load, so a
turn is sampled under one version, the one it is recorded with. (vLLM's own ``pause_generation`` is not
enough: a turn sent while it pauses is queued, then sampled under the new weights.)

vLLM is the ``gpu`` extra (its CPU build where there is no GPU, installed by ``.ci/setup``); this module
imports it only when the engine is built. ``tests/test_vllm_real_engine.py`` runs it on vLLM's CPU build;
``tests/test_vllm_engine.py`` covers the conversion of vLLM's outputs and the missing-vLLM error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from eapo.inference.sampling import SampleRequest, SampleResult
from eapo.inference.vllm_server import WORKER_EXTENSION, server_env

log = logging.getLogger(__name__)


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "rollout.engine is 'vllm' but vLLM is not installed: install the gpu extra (pip install '.[gpu]') "
            "on a machine with a GPU, or use engine 'transformers' (CPU) or 'remote' (policy servers)"
        ) from exc
    return vllm


def to_result(completion: Any) -> SampleResult:
    """A vLLM ``CompletionOutput`` (``logprobs=0``: one ``{token_id: Logprob}`` per sampled token) as a
    turn. A stop token ends the turn with ``finish="stop"``; vLLM keeps it among the returned ids. A stop
    string does too, with ``stop_reason`` the string: vLLM checks stop strings on the detokenized text
    after each step and cuts only the *text* — ``token_ids`` and ``logprobs`` keep every sampled token,
    the one that completed the string included (``vllm/v1/engine/detokenizer.py``, ``output_processor.py``)."""
    ids = list(completion.token_ids)
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no log-prob per sampled token; the engine must ask for logprobs=0")
    logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs, strict=True)]
    finish = "stop" if completion.finish_reason == "stop" else "length"
    reason = getattr(completion, "stop_reason", None)
    return SampleResult(ids, logprobs, finish, reason if finish == "stop" and isinstance(reason, str) else None)


class VLLMEngine:
    def __init__(self, path: Path, version: int, engine_args: dict[str, Any]):
        vllm = import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        os.environ.update(server_env(os.environ))  # the CPU build's KV cache size, as for the servers
        args = {"model": str(path), "worker_extension_cls": WORKER_EXTENSION, "disable_log_stats": True}
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**(args | engine_args)))
        self._vllm, self._version, self._ids = vllm, version, itertools.count()
        self._open, self._idle, self._in_flight = asyncio.Event(), asyncio.Event(), 0  # see load_version
        self._open.set()
        self._idle.set()

    @property
    def version(self) -> int:
        return self._version

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        await self._open.wait()  # no turn starts while a version loads
        version = self._version
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._sample(request), version
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _sample(self, request: SampleRequest) -> SampleResult:
        from vllm.sampling_params import RequestOutputKind

        params = self._vllm.SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_token_ids=sorted(request.stop_ids),
            stop=list(request.stop_strings),
            include_stop_str_in_output=True,
            skip_special_tokens=False,  # the tiny world's tags are special tokens: keep them in the checked text
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        prompt = self._vllm.TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        outputs = [out async for out in self._llm.generate(prompt, params, request_id=f"eapo-{next(self._ids)}")]
        if not outputs:
            raise RuntimeError("vLLM finished a request without an output")
        return to_result(outputs[-1].outputs[0])

    async def load_version(self, version: int, path: Path) -> None:
        """Every worker loads ``path`` (checksums verified there); in-flight turns finish first, new ones
        wait for the load. A failed load raises and the engine keeps its version."""
        self._open.clear()
        try:
            await self._idle.wait()
            await self._llm.collective_rpc("eapo_load_weights", args=(str(path),))
            await self._llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
            self._version = version
        finally:
            self._open.set()
        log.info("vLLM policy now at version %d", version)

    async def close(self) -> None:
        """Shut the engine down and let it go: an AsyncLLM alive until interpreter exit shuts down again in
        its ``__del__``, when vLLM's module globals are already gone (an ignored TypeError at exit).
        Closing again does nothing."""
        if hasattr(self, "_llm"):
            self._llm.shutdown()
            del self._llm
