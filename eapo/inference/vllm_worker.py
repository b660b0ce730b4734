"""Runs inside vLLM's workers: ``python -m vllm.entrypoints.openai.api_server … --worker-extension-cls
eapo.inference.vllm_worker.EAPOWorkerExtension`` (with ``VLLM_SERVER_DEV_MODE=1``) makes
``POST /collective_rpc {"method": …, "args": […]}`` call these methods in every worker (the in-process
engine calls them through ``AsyncLLM.collective_rpc``):

* ``eapo_load_weights(path)``: a published weight version from shared storage;
* ``eapo_join_broadcast(address, rank, world_size, backend)`` and ``eapo_receive_broadcast()``: the
  learner's broadcast option (``proto.broadcast``); a worker of a tensor-parallel server joins as
  ``rank`` plus its own rank, and vLLM's ``load_weights`` shards the full tensors it receives.

Weights go in through vLLM's in-place ``reload_weights(weights_iterator=…)`` (vLLM ≥ 0.32): a plain
``model.load_weights`` is not enough where vLLM has repacked a layer after loading — its CPU backend
moves linear weights into its own kernel layout and leaves ``weight`` empty, so a second load fails
(``Attempted to load weight … into parameter (torch.Size([0]))``). ``reload_weights`` restores the
checkpoint layout, loads, and repacks. A whole version goes in as one iterator: a layer that receives
nothing keeps its old weights. That includes a tied LM head (its weight *is* the embedding's, which
does reload), so what the backend derived from it (the CPU backend's packed logits GEMM) is derived
again here. Older vLLM (no ``weights_iterator``) falls back to ``load_weights``.

Nothing here imports vLLM: the class is mixed into vLLM's worker, which provides ``model_runner`` and
``rank``. Tested on vLLM's CPU build (``tests/test_vllm_real_*.py``); the CPU server
(``eapo.inference.cpu_server``) implements the same calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from proto.broadcast import Backend, Group, join, receive
from proto.weights import read_manifest, verify_version


def shard_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a version directory's safetensors shards, one at a time (never all in memory)."""
    from safetensors.torch import safe_open

    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def reprocess_shared_weights(model: torch.nn.Module) -> None:
    """Run vLLM's post-load processing again on every layer whose weight is another layer's (a tied LM
    head): the reload skipped it, as nothing in a checkpoint names it, but its weight has changed."""
    owners: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or owners.setdefault(id(weight), module) is module:
            continue
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


class EAPOWorkerExtension:
    model_runner: object  # provided by vLLM's worker
    rank: int  # provided by vLLM's worker: its rank within the server
    _eapo_group: Group | None = None
    _eapo_version: int | None = None

    def _eapo_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """All of a version's tensors into the model, in place, through vLLM's reload path where it has
        one (the worker's ``reload_weights`` sets vLLM's current config around the runner's)."""
        runner = self.model_runner
        reload = getattr(runner, "reload_weights", None)
        if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
            getattr(self, "reload_weights", reload)(weights_iterator=weights)
            reprocess_shared_weights(runner.model)  # type: ignore[attr-defined]
        else:
            runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]

    def eapo_load_weights(self, path: str) -> None:
        """Verify the version's checksums, then stream its safetensors shards into the model (nothing to
        do when the learner has broadcast this version already)."""
        if read_manifest(Path(path)).version == self._eapo_version:
            return
        manifest = verify_version(Path(path))
        self._eapo_load(shard_tensors(Path(path)))
        self._eapo_version = manifest.version

    def eapo_join_broadcast(
        self, address: str, rank: int, world_size: int, backend: Backend = "nccl", timeout_s: float = 300.0
    ) -> None:
        self._eapo_group = join(address, rank + getattr(self, "rank", 0), world_size, backend, timeout_s)

    def eapo_receive_broadcast(self) -> int:
        if self._eapo_group is None:
            raise RuntimeError("eapo_receive_broadcast before eapo_join_broadcast")
        version, tensors = receive(self._eapo_group)
        self._eapo_load(tensors.items())
        self._eapo_version = version
        return version
