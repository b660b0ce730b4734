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
