"""Runs inside vLLM's GPU workers: ``vllm serve … --worker-extension-cls
rollout_service.vllm_worker.EAPOWorkerExtension`` (with ``VLLM_SERVER_DEV_MODE=1``) makes
``POST /collective_rpc {"method": …, "args": […]}`` call these methods in every worker:

* ``eapo_load_weights(path)``: a published weight version from shared storage;
* ``eapo_join_broadcast(address, rank, world_size, backend)`` and ``eapo_receive_broadcast()``: the
  learner's broadcast option (``proto.broadcast``); a worker of a tensor-parallel server joins as
  ``rank`` plus its own rank, and vLLM's ``load_weights`` shards the full tensors it receives.

Nothing here imports vLLM: the class is mixed into vLLM's worker, which provides ``model_runner`` and
``rank``. Not exercised on CPU (no vLLM there); the CPU server implements the same calls for the tests.
"""

from __future__ import annotations

from pathlib import Path

from proto.broadcast import Backend, Group, join, receive
from proto.weights import read_manifest, verify_version


class EAPOWorkerExtension:
    model_runner: object  # provided by vLLM's worker
    rank: int  # provided by vLLM's worker: its rank within the server
    _eapo_group: Group | None = None
    _eapo_version: int | None = None

    def eapo_load_weights(self, path: str) -> None:
        """Verify the version's checksums, then stream its safetensors shards into the model (nothing to
        do when the learner has broadcast this version already)."""
        from safetensors.torch import safe_open

        if read_manifest(Path(path)).version == self._eapo_version:
            return
        manifest = verify_version(Path(path))
        model = self.model_runner.model  # type: ignore[attr-defined]
        for shard in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                model.load_weights(weights=((name, f.get_tensor(name)) for name in f.keys()))  # noqa: SIM118
        self._eapo_version = manifest.version

    def eapo_join_broadcast(
        self, address: str, rank: int, world_size: int, backend: Backend = "nccl", timeout_s: float = 300.0
    ) -> None:
        self._eapo_group = join(address, rank + getattr(self, "rank", 0), world_size, backend, timeout_s)

    def eapo_receive_broadcast(self) -> int:
        if self._eapo_group is None:
            raise RuntimeError("eapo_receive_broadcast before eapo_join_broadcast")
        version, tensors = receive(self._eapo_group)
        self.model_runner.model.load_weights(weights=tensors.items())  # type: ignore[attr-defined]
        self._eapo_version = version
        return version
