"""Chaos: the CPU stack as real processes (Redis with persistence, two expert servers, the gateway, the
learner, a rollout replica) under a supervisor that restarts whatever dies, as Kubernetes would. At
seeded moments a fault SIGKILLs or SIGTERMs one of them — every component at least twice, Redis
included. Afterwards the ledger must hold: no trajectory group trained twice, every produced group
trained or counted in a drop reason (or still waiting), weight versions monotonic and verified, the
annealing state never going backwards, every process gone and its port free."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from helpers import wait_for
from stack import ping, port_free

from eapo.core.config import SupervisionConfig
from eapo.core.net import free_port
from eapo.dev.supervise import Component, Supervisor, terminate
from eapo.dev.up import http_ok
from proto import AnnealState, WeightManifest, decode
from proto.weights import verify_version, version_dir

pytestmark = pytest.mark.e2e
SEED, FAULTS, FINAL_STEPS = 20261123, 12, 6
# The run has no end while faults are injected (a slow machine's long recoveries cannot let it finish
# first); after the last fault its end is set FINAL_STEPS ahead, and the learner restarted into it.
OPEN_ENDED = 1_000_000


@dataclass
class Part:
    """A component of the stack as the test sees it: its supervised process and how to tell it is up."""

    name: str
    component: Component
    healthy: Callable[[], bool]

    @property
    def process(self) -> subprocess.Popen | None:
        return self.component.process

    def kill(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)


@pytest.mark.timeout(900)
def test_stack_survives_seeded_faults_with_nothing_lost_or_trained_twice(stack):
    rng = random.Random(SEED)
    redis_server = stack.private_redis()
    client, names = stack.client, stack.names
    stack.audit()
    ports = {k: free_port() for k in ("expert-0", "expert-1", "gateway", "rollout", "learner")}
    run_dir = stack.run_dir
    stack.write(
        redis={"claim_idle_ms": 2000},
        gateway={
            "port": ports["gateway"],
            "backends": [{"model": "expert", "url": f"http://127.0.0.1:{ports[e]}"} for e in ("expert-0", "expert-1")],
            "health_interval_s": 0.5,
            "eject_s": 1.0,
        },
        # A near-zero learning rate: the run always progresses (faults are the subject here).
        learner={"steps": OPEN_ENDED, "lr": 1.0e-9, "metrics_port": ports["learner"], "keep_versions": 100},
        rollout={
            "gateway_url": f"http://127.0.0.1:{ports['gateway']}",
            "metrics_port": ports["rollout"],
            "expert_timeout_s": 5.0,
        },
        # Constant annealing, with turns left to consult in: the consult paths stay exercised.
        anneal={
            "acceptance": {"kind": "constant", "start": 0.5, "end": 0.5},
            "budget": {"kind": "constant", "start": 3, "end": 3},
        },
    )
    # Restart whatever dies after a short back-off, as Kubernetes would (no budget: faults are the
    # subject); the learner is done after its last step, the rollout once it drained after that.
    supervisor = Supervisor(SupervisionConfig(max_restarts=1000, backoff_s=0.5, backoff_max_s=0.5))
    parts: dict[str, Part] = {}

    end = {"steps": OPEN_ENDED}

    def finished(code: int) -> bool:
        """Exited 0 after the run's last step (the learner, or a replica that saw its done flag)."""
        return code == 0 and stack.last_step() == end["steps"]

    def part(name: str, role: str, extra_env: dict[str, str], healthy, finished=None) -> None:
        component = supervisor.add(
            Component(name, lambda: stack.start(role, name=name, env=extra_env), finished or (lambda code: False))
        )
        parts[name] = Part(name, component, healthy)

    ports["redis"] = redis_server.port
    parts["redis"] = Part("redis", supervisor.add(redis_server.component()), lambda: ping(redis_server.url))
    for e in ("expert-0", "expert-1"):
        p = ports[e]
        part(
            e,
            "expert-server",
            {"EAPO_EXPERT_SERVER__PORT": str(p)},
            lambda p=p: http_ok(f"http://127.0.0.1:{p}/health"),
        )
    part("gateway", "gateway", {}, lambda: http_ok(f"http://127.0.0.1:{ports['gateway']}/readyz"))
    part("learner", "learner", {}, lambda: http_ok(f"http://127.0.0.1:{ports['learner']}/metrics"), finished)
    learner = parts["learner"].component
    part("rollout", "rollout", {}, lambda: http_ok(f"http://127.0.0.1:{ports['rollout']}/metrics"), finished)

    anneal_steps: list[int] = []
    versions: list[int] = []
    stopping = threading.Event()

    def watch_published() -> None:  # the annealing state and weight version as rollout sees them
        watcher = redis.Redis.from_url(redis_server.url, socket_timeout=1)
        while not stopping.is_set():
            try:
                anneal, weights = watcher.mget(names.anneal, names.weights)
                if anneal and weights:
                    anneal_steps.append(decode(anneal, AnnealState).step)
                    versions.append(decode(weights, WeightManifest).version)
            except redis.RedisError:
                pass
            time.sleep(0.1)

    supervising = threading.Thread(target=supervisor.run, args=(stopping,), daemon=True)
    watcher = threading.Thread(target=watch_published, daemon=True)
    supervising.start()
    watcher.start()
    faults: list[dict] = []
    try:
        wait_for(lambda: stack.last_step() > 0, 240, "a first learner step before faults")
        targets = [n for n in parts for _ in range(2)]  # every component at least twice
        rng.shuffle(targets)
        for name in targets[:FAULTS]:
            time.sleep(rng.uniform(0.5, 1.5))  # the seeded fault schedule, not a wait for anything
            target, sig = parts[name], rng.choice([signal.SIGKILL, signal.SIGTERM])
            t0 = time.monotonic()
            target.kill(sig)
            while target.healthy() and time.monotonic() - t0 < 5:  # gone first…
                time.sleep(0.05)
            wait_for(target.healthy, 180, f"{name} recovered from {sig.name}")  # …then back
            faults.append({"target": name, "signal": sig.name, "recovered_s": round(time.monotonic() - t0, 2)})
        end["steps"] = stack.last_step() + FINAL_STEPS
        stack.update(learner={"steps": end["steps"]})
        parts["learner"].kill(signal.SIGTERM)  # it stops at a step boundary and comes back with the run's end
        wait_for(lambda: learner.done, 300, "the learner finished its run")
        # it drains and exits once the learner says done
        wait_for(lambda: parts["rollout"].component.done, 120, "the rollout drained")
    finally:
        stopping.set()
        supervising.join(timeout=30)
        watcher.join(timeout=5)
        terminate([p.process for n, p in parts.items() if n != "redis" and p.process is not None])
    (stack.root / "faults.json").write_text(json.dumps(faults, indent=2))
    print("\nfaults:", json.dumps(faults))
    assert len(faults) == FAULTS, faults

    # Ledger: every group produced, as the audit group saw it, trained once or counted.
    print("ledger:", json.dumps(stack.ledger(end["steps"])))
    # Weights: the last version is the last step's; every version kept on disk verifies (older ones
    # are pruned once no rollout reads them); what rollout saw only ever went forward.
    manifest = decode(client.get(names.weights), WeightManifest)
    assert manifest.version == end["steps"]
    kept = sorted(int(p.name.removeprefix("v")) for p in (run_dir / "weights").glob("v*") if p.is_dir())
    assert kept and kept[-1] == end["steps"]
    for v in kept:
        assert verify_version(version_dir(run_dir / "weights", v)).version == v
    for series in (anneal_steps, versions):
        assert series and all(a <= b for a, b in itertools.pairwise(series))
    redis_server.stop()
    # No process left behind, every port free again.
    for p in parts.values():
        assert p.process is not None and p.process.poll() is not None, p.name
    assert [port for port in ports.values() if not port_free(port)] == []
    print("restarts:", {c.name: c.restarts for c in supervisor.components.values()})
