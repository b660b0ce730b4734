"""Runs inside vLLM's GPU workers: ``vllm serve … --worker-extension-cls
rollout_service.vllm_worker.EAPOWorkerExtension`` (with ``VLLM_SERVER_DEV_MODE=1``) makes
``POST /collective_rpc {"method": "eapo_load_weights", "args": [path]}`` load a published weight
version into every worker. Nothing here imports vLLM: the class is mixed into vLLM's worker, which
provides ``model_runner``. Not exercised on CPU (no vLLM there); the CPU server implements the same
call for the tests.
"""

from __future__ import annotations

from pathlib import Path


class EAPOWorkerExtension:
    model_runner: object  # provided by vLLM's worker

    def eapo_load_weights(self, path: str) -> None:
        """Verify the version's checksums, then stream its safetensors shards into the model."""
        from safetensors.torch import safe_open

        from proto.weights import verify_version

        verify_version(Path(path))
        model = self.model_runner.model  # type: ignore[attr-defined]
        for shard in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                model.load_weights(weights=((name, f.get_tensor(name)) for name in f.keys()))  # noqa: SIM118
