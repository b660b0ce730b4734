"""Builders and servers shared by the tests."""

from __future__ import annotations

import sys
import time
import uuid

import numpy as np

from eapo.redis_server import free_port
from proto import AnnealState, PromptTask, Trajectory, TrajectoryGroup, TurnRecord


def group(rng: np.random.Generator, scores: list[float]) -> TrajectoryGroup:
    samples = []
    for i, score in enumerate(scores):
        n, prompt = int(rng.integers(20, 40)), 8
        mask = np.arange(n) >= prompt
        samples.append(
            Trajectory(
                sample_index=i,
                token_ids=rng.integers(7, 100, n).astype(np.int32),
                loss_mask=mask,
                behaviour_logprobs=np.where(mask, -4.6, 0).astype(np.float32),
                prompt_len=prompt,
                turns=[TurnRecord(start=prompt, end=n, policy_version=0, finish="eos")],
                score=score,
                finish="answer",
                seed=i,
            )
        )
    return TrajectoryGroup(
        group_id=uuid.uuid4().hex,
        prompt=PromptTask(prompt_id="p", problem="1+1", answer="2"),
        anneal=AnnealState(step=0, acceptance=1, budget=2, penalty=0),
        samples=samples,
        rollout_replica="test",
        created_at=time.time(),
    )


def torchrun(ranks: int) -> list[str]:
    """The launcher's command line for ``ranks`` local processes on loopback, before the script."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--nnodes=1",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
    ]


class ServerThread:
    """A real uvicorn server on 127.0.0.1, in a thread with its own event loop."""

    def __init__(self, app, port: int):
        import threading

        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FakeBackend:
    """A fake vLLM pod (``expert_gateway.fake_backend``) in its own process, so it can be SIGKILLed."""

    def __init__(self, name: str, model: str = "expert", latency_ms: float = 0.0):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "expert_gateway.fake_backend", "--port", str(self.port), "--name", name,
                     "--model", model, "--latency-ms", str(latency_ms)]  # fmt: skip
        self.process = None

    def __enter__(self) -> FakeBackend:
        import subprocess

        import httpx

        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake backend {self.name} did not start: {self.process.stderr.read()!r}")
            time.sleep(0.05)

    def control(self, **settings) -> dict:
        import httpx

        return httpx.post(f"{self.url}/control", json=settings, timeout=5).json()

    def counters(self) -> dict:
        return self.control()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_audit(client, names) -> None:
    """A consumer group that sees every trajectory group produced; like any group, it keeps the
    learner's trimming from removing what it has not read."""
    client.xgroup_create(names.trajectories, "audit", id="0", mkstream=True)


def audited(client, names) -> list[TrajectoryGroup]:
    """Every group produced since ``start_audit``, in stream order (re-rolled prompts included)."""
    from eapo.streams import FIELD
    from proto import decode

    reply = client.xreadgroup("audit", "auditor", {names.trajectories: ">"}) or []
    return [decode(fields[FIELD], TrajectoryGroup) for _stream, entries in reply for _id, fields in entries]
