"""Policy engines behind one interface.

``TransformersEngine`` is the CPU implementation: all concurrent episodes' generation requests share
batched forward passes, and published weight versions are loaded from shared storage and swapped in
once the running turns finish. ``RemotePolicyEngine`` (``rollout_service.remote_engine``) drives vLLM
policy servers through the same protocol, and ``VLLMEngine`` (``rollout_service.vllm_engine``) runs vLLM in-process.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedTokenizerFast

from eapo.core.config import EAPOConfig
from eapo.inference.model import load_model
from eapo.inference.sampling import Batcher, SampleRequest, SampleResult
from proto.weights import verify_version

log = logging.getLogger(__name__)


class PolicyEngine(Protocol):
    tokenizer: PreTrainedTokenizerFast

    @property
    def version(self) -> int: ...

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        """Sample one turn; returns the result and the weight version that produced it."""
        ...

    async def load_version(self, version: int, path: Path) -> None: ...

    async def close(self) -> None: ...


class TransformersEngine:
    def __init__(self, path: Path, version: int, max_batch: int = 64):
        model, self.tokenizer = load_model(path)
        self._batcher = Batcher(model, self.tokenizer.pad_token_id, max_batch, version, self.tokenizer)

    @property
    def version(self) -> int:
        return self._batcher.version

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        return await self._batcher.sample(request)

    async def load_version(self, version: int, path: Path) -> None:
        """Verify the published checksums, load off the event loop, swap in once the running turns finish."""
        await asyncio.to_thread(verify_version, path)
        model, _ = await asyncio.to_thread(load_model, path)
        self._batcher.set_model(model, version)
        log.info("policy weights now at version %d", version)

    async def close(self) -> None:
        await self._batcher.close()


async def open_engine(cfg: EAPOConfig, weights: Path, version: int) -> PolicyEngine:
    """The configured engine, serving published version ``version`` (at ``weights``)."""
    rc = cfg.rollout
    if rc.engine == "vllm":
        from rollout_service.vllm_engine import VLLMEngine

        return VLLMEngine(weights, version, rc.vllm_args)
    if rc.engine == "remote":
        from rollout_service.remote_engine import RemotePolicyEngine

        engine = RemotePolicyEngine(rc.policy_urls, rc.policy_model, weights, version=-1)
        await engine.load_version(version, weights)  # servers may hold any version: bring all to this one
        return engine
    return await asyncio.to_thread(TransformersEngine, weights, version, rc.max_batch)
