"""Builders and servers shared by the tests."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from eapo.core.net import free_port
from eapo.dev.supervise import terminate
from proto import AnnealState, ConsultRecord, PromptTask, Trajectory, TrajectoryGroup, TurnRecord


def consult_group(samples: list[tuple[float, int]], penalty: float) -> TrajectoryGroup:
    """A group of (score, consult count) samples, each with two policy tokens, rolled out under λ = ``penalty``."""

    def sample(i, score, n_consults):
        consults = [
            ConsultRecord(
                turn=0, query="q", outcome="answer", draw=0.1, accepted=True, injected_start=3, injected_end=4
            )
            for _ in range(n_consults)
        ]
        return Trajectory(
            sample_index=i,
            token_ids=np.arange(4),
            loss_mask=np.array([0, 0, 1, 1], bool),
            behaviour_logprobs=np.zeros(4),
            prompt_len=2,
            turns=[],
            consults=consults,
            score=score,
            finish="answer",
            seed=0,
        )

    return TrajectoryGroup(
        group_id="g",
        prompt=PromptTask(prompt_id="p", problem="x", answer="1"),
        anneal=AnnealState(step=0, acceptance=1, budget=2, penalty=penalty),
        samples=[sample(i, score, calls) for i, (score, calls) in enumerate(samples)],
        rollout_replica="r",
        created_at=0,
    )


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


def side_by_side(launches: Mapping[str, list[str]], logs: Path, timeout_s: float, **popen) -> None:
    """Independent launches run at once (on 2 cores their time is the bound, not their number), each
    logging to ``logs/NAME.log`` (a file: nobody reads a pipe meanwhile); each must exit 0 within
    ``timeout_s``, or the assertion shows the end of its log. Whatever still runs on the way out is
    stopped (SIGTERM, then SIGKILL) and reaped."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, argv in launches.items():
            with open(logs / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **popen)
        for name, proc in procs.items():
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None  # still running
            log_text = (logs / f"{name}.log").read_text()[-5000:]
            assert code == 0, f"{name}: exit code {code} after up to {timeout_s:.0f}s\n{log_text}"
    finally:
        terminate(list(procs.values()))


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
    """A fake vLLM pod (``tests.fake_backend``) in its own process, so it can be SIGKILLed."""

    def __init__(self, name: str, model: str = "expert", latency_ms: float = 0.0):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "tests.fake_backend", "--port", str(self.port), "--name", name,
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
    from proto import decode
    from proto.streams import FIELD

    reply = client.xreadgroup("audit", "auditor", {names.trajectories: ">"}) or []
    return [decode(fields[FIELD], TrajectoryGroup) for _stream, entries in reply for _id, fields in entries]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a PID 1 that never reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll ``predicate`` until true; fail after a generous ``timeout_s`` naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(interval_s)


def assert_ledger(client, names, metrics_path, steps: int) -> dict:
    """The chaos suite's ledger (needs ``start_audit`` before anything was produced): steps continued
    across restarts and never repeated, up to ``steps``; no group trained twice; every group trained
    was produced; every produced group trained, counted in a drop reason, or still waiting. Returns
    the figures for the test's output."""
    import json
    from collections import Counter

    produced = Counter(g.group_id for g in audited(client, names))
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    done = [r["step"] for r in records]
    assert done == sorted(set(done)) and done[-1] == steps, done  # continued across restarts, never repeated
    trained = [gid for r in records for gid in r["group_ids"]]
    assert len(trained) == len(set(trained))  # nothing trained twice
    # The learner's own record of what it trained (a step killed after its checkpoint, before its
    # metrics line, is in it): a superset of the metrics lines, and all of it was produced.
    trained_set = {m.decode() for m in client.zrange(names.trained, 0, -1)}
    assert set(trained) <= trained_set <= set(produced)
    counters = {k.decode(): int(v) for k, v in client.hgetall(names.counters).items()}
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped:"))
    learner_group = {i["name"].decode(): i for i in client.xinfo_groups(names.trajectories)}["learner"]
    # Waiting: delivered and not acknowledged, or not delivered yet (counted here: XINFO's ``lag`` is
    # nil on Redis 7 once it cannot tell, and absent on 6.2).
    undelivered = client.xrange(names.trajectories, min="(" + learner_group["last-delivered-id"].decode(), max="+")
    waiting = learner_group["pending"] + len(undelivered)
    untrained = sum(produced.values()) - len(trained_set)
    assert untrained <= dropped + waiting, (untrained, counters, waiting)  # none lost without a reason
    return {
        "produced_entries": sum(produced.values()),
        "distinct_groups": len(produced),
        "trained": len(trained_set),
        "waiting": waiting,
        **{k: v for k, v in counters.items() if k.startswith(("dropped:", "dead_letter:"))},
    }
