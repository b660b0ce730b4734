"""A policy served by OpenAI-compatible policy servers (vLLM on GPUs; ``eapo expert-server`` on CPU).

Token-in, token-out over vLLM's completions API: the prompt goes as token ids, ``stop_token_ids`` and
``stop`` strings end a turn, and ``logprobs=0`` with ``return_tokens_as_token_ids`` brings back exactly
the sampled ids and their log-probs — no re-tokenization anywhere. When a stop string fires, vLLM's
ids and log-probs include the token that completed it (only its text is cut) and ``stop_reason``
names the string: the same turn the CPU engine samples (``eapo.inference.sampling``). Special tokens stay in
the text vLLM checks (``skip_special_tokens: false``), where the tiny world's tags are special tokens.
Requests spread over the servers (least outstanding).

New weight versions: every server loads the published safetensors version from shared storage through
vLLM's dev-mode ``POST /collective_rpc`` calling ``eapo_load_weights(path)`` — implemented in vLLM's
workers by ``eapo.inference.vllm_worker.EAPOWorkerExtension`` (``--worker-extension-cls``) and by the
CPU server itself. A turn is recorded with the version that was current when it was sent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
from transformers import PreTrainedTokenizerFast

from eapo.inference.sampling import SampleRequest, SampleResult

log = logging.getLogger(__name__)


class PolicyServerError(RuntimeError):
    """A policy server refused a request or answered something that is not a completion."""


class RemotePolicyEngine:
    def __init__(self, urls: list[str], model: str, tokenizer_dir: Path, version: int, timeout_s: float = 600.0):
        if not urls:
            raise ValueError("rollout.policy_urls is empty: the remote engine needs at least one policy server")
        self.urls, self.model, self._version = [u.rstrip("/") for u in urls], model, version
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        self._in_flight = dict.fromkeys(self.urls, 0)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def version(self) -> int:
        return self._version

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout)
        return self._session

    async def _post(self, url: str, path: str, body: dict) -> dict:
        async with self._session_().post(f"{url}{path}", json=body) as resp:
            payload = await resp.json(content_type=None)
            if resp.status != 200:
                raise PolicyServerError(f"{url}{path}: HTTP {resp.status}: {str(payload)[:300]}")
            return payload

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        version = self._version
        url = min(self.urls, key=self._in_flight.__getitem__)
        self._in_flight[url] += 1
        try:
            payload = await self._post(
                url,
                "/v1/completions",
                {
                    "model": self.model,
                    "prompt": request.prompt_ids,
                    "max_tokens": request.max_new_tokens,
                    "temperature": request.temperature,
                    "top_p": request.top_p,
                    "seed": request.seed,
                    "stop_token_ids": sorted(request.stop_ids),
                    "stop": list(request.stop_strings),
                    "include_stop_str_in_output": True,
                    "logprobs": 0,
                    "return_tokens_as_token_ids": True,
                    "skip_special_tokens": False,
                },
            )
        finally:
            self._in_flight[url] -= 1
        try:
            choice = payload["choices"][0]
            tokens, logprobs = choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]
            ids = [int(t.removeprefix("token_id:")) for t in tokens]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PolicyServerError(f"{url}: not a token-id completion ({type(exc).__name__}: {exc})") from exc
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        reason = choice.get("stop_reason")
        stop_string = reason if finish == "stop" and reason in request.stop_strings else None
        result = SampleResult(ids, [float(x) for x in logprobs], finish, stop_string)
        return result, version

    async def load_version(self, version: int, path: Path) -> None:
        """Every server loads ``path`` (all or nothing is not possible over HTTP: a failure raises, the
        version stays, and the rollout retries at its next weight check)."""
        for url in self.urls:
            await self._post(url, "/collective_rpc", {"method": "eapo_load_weights", "args": [str(path)]})
        self._version = version
        log.info("policy servers now at version %d", version)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
