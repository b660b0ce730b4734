"""Chaos: the CPU stack as real processes (Redis with persistence, two expert servers, the gateway, the
learner, a rollout replica) under a supervisor that restarts whatever dies, as Kubernetes would. At
seeded moments a fault SIGKILLs or SIGTERMs one of them — every component at least twice, Redis
included. Afterwards the ledger must hold: no trajectory group trained twice, every produced group
trained or counted in a drop reason (or still waiting), weight versions monotonic and verified, the
annealing state never going backwards, every process gone and its port free."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml
from helpers import audited, start_audit

from eapo.redis_server import RedisServer, free_port
from eapo.up import http_ok
from proto import AnnealState, Names, WeightManifest, decode
from proto.weights import verify_version, version_dir

pytestmark = pytest.mark.e2e
SEED, STEPS, FAULTS = 20261123, 120, 12


@dataclass
class Component:
    name: str
    argv: list[str] | None  # None: Redis, started through RedisServer
    env: dict[str, str]
    healthy: object  # () -> bool
    port: int
    process: subprocess.Popen | None = None
    restarts: int = 0
    log: Path | None = None

    def start(self) -> None:
        assert self.argv is not None and self.log is not None
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT
            )


@dataclass
class Stack:
    tmp: Path
    redis: RedisServer
    parts: dict[str, Component] = field(default_factory=dict)
    stopping: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def alive(self, part: Component) -> bool:
        proc = self.redis.process if part.argv is None else part.process
        return proc is not None and proc.poll() is None

    def restart(self, part: Component) -> None:
        part.restarts += 1
        if part.argv is None:
            self.redis = RedisServer(self.redis.data_dir, port=self.redis.port).start()
        else:
            part.start()

    def finished(self) -> bool:
        """The learner exited after its last step (a SIGTERMed learner also exits 0, earlier)."""
        learner = self.parts["learner"].process
        metrics = self.tmp / "run" / "metrics.jsonl"
        if learner is None or learner.returncode != 0 or not metrics.exists():
            return False
        lines = metrics.read_text().splitlines()
        return bool(lines) and json.loads(lines[-1])["step"] == STEPS

    def supervise(self) -> None:
        """Restart whatever exited, except the learner once it finished its run."""
        while not self.stopping:
            for part in self.parts.values():
                if self.stopping or self.alive(part):
                    continue
                if part.name == "learner" and self.finished():
                    self.done.set()
                    continue
                time.sleep(0.5)  # a crash-looping process backs off, as under Kubernetes
                if not self.stopping:
                    self.restart(part)
            time.sleep(0.1)

    def kill(self, part: Component, sig: signal.Signals) -> None:
        proc = self.redis.process if part.argv is None else part.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)


@pytest.mark.timeout(900)
def test_stack_survives_seeded_faults_with_nothing_lost_or_trained_twice(tiny_world, tmp_path):
    rng = random.Random(SEED)
    redis_server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(redis_server.url)
    prefix = "chaos"
    names = Names(prefix)
    start_audit(client, names)
    ports = {k: free_port() for k in ("expert-0", "expert-1", "gateway", "rollout", "learner")}
    run_dir = tmp_path / "run"
    config = tmp_path / "chaos.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "world": tiny_world.model_dump(mode="json"),
                "redis": {"prefix": prefix, "claim_idle_ms": 2000},
                "gateway": {
                    "port": ports["gateway"],
                    "backends": [
                        {"model": "expert", "url": f"http://127.0.0.1:{ports[e]}"} for e in ("expert-0", "expert-1")
                    ],
                    "health_interval_s": 0.5,
                    "eject_s": 1.0,
                },
                # Zero-signal groups kept (the test world never solves a problem) and a near-zero learning
                # rate: the run always progresses (faults are the subject here).
                "learner": {
                    "steps": STEPS,
                    "dynamic_sampling": False,
                    "batch_groups": 2,
                    "lr": 1.0e-9,
                    "metrics_port": ports["learner"],
                    "keep_versions": 100,
                },
                "rollout": {
                    "gateway_url": f"http://127.0.0.1:{ports['gateway']}",
                    "metrics_port": ports["rollout"],
                    "max_new_tokens": 32,
                    "expert_timeout_s": 5.0,
                },
                # Constant annealing, with turns left to consult in: the consult paths stay exercised.
                "anneal": {
                    "acceptance": {"kind": "constant", "start": 0.5, "end": 0.5},
                    "budget": {"kind": "constant", "start": 3, "end": 3},
                    "penalty": {"kind": "constant", "start": 0.1, "end": 0.1},
                },
            }
        )
    )
    env = {"REDIS_URL": redis_server.url, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "eapo.cli"]
    stack = Stack(tmp_path, redis_server)

    def part(name, role, extra_env, healthy):
        argv = None if role is None else [*cli, role, "--config", str(config)]
        c = Component(
            name, argv, env | extra_env, healthy, ports.get(name, redis_server.port), log=tmp_path / f"{name}.log"
        )
        stack.parts[name] = c
        return c

    part("redis", None, {}, lambda: _ping(stack.redis.url))
    for e in ("expert-0", "expert-1"):
        p = ports[e]
        part(
            e,
            "expert-server",
            {"EAPO_EXPERT_SERVER__PORT": str(p)},
            lambda p=p: http_ok(f"http://127.0.0.1:{p}/health"),
        )
    part("gateway", "gateway", {}, lambda: http_ok(f"http://127.0.0.1:{ports['gateway']}/readyz"))
    part("learner", "learner", {}, lambda: http_ok(f"http://127.0.0.1:{ports['learner']}/metrics"))
    part("rollout", "rollout", {}, lambda: http_ok(f"http://127.0.0.1:{ports['rollout']}/metrics"))
    for c in stack.parts.values():
        if c.argv is not None:
            c.start()

    anneal_steps: list[int] = []
    versions: list[int] = []

    def watch_published() -> None:  # the annealing state and weight version as rollout sees them
        watcher = redis.Redis.from_url(redis_server.url, socket_timeout=1)
        while not stack.stopping:
            try:
                anneal, weights = watcher.mget(names.anneal, names.weights)
                if anneal and weights:
                    anneal_steps.append(decode(anneal, AnnealState).step)
                    versions.append(decode(weights, WeightManifest).version)
            except redis.RedisError:
                pass
            time.sleep(0.1)

    supervisor = threading.Thread(target=stack.supervise, daemon=True)
    watcher = threading.Thread(target=watch_published, daemon=True)
    supervisor.start()
    watcher.start()
    metrics = run_dir / "metrics.jsonl"
    faults: list[dict] = []
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().strip()):  # warm: a first step trained
            assert time.monotonic() < deadline, "no learner step before the faults"
            time.sleep(0.2)
        targets = [n for n in stack.parts for _ in range(2)]  # every component at least twice
        rng.shuffle(targets)
        for name in targets[:FAULTS]:
            time.sleep(rng.uniform(1.5, 3.5))
            if stack.done.is_set():
                break
            target, sig = stack.parts[name], rng.choice([signal.SIGKILL, signal.SIGTERM])
            t0 = time.monotonic()
            stack.kill(target, sig)
            while target.healthy() and time.monotonic() - t0 < 5:  # gone first…
                time.sleep(0.05)
            while not target.healthy():  # …then back
                assert time.monotonic() - t0 < 180, f"{name} did not recover from {sig.name}"
                time.sleep(0.1)
            faults.append({"target": name, "signal": sig.name, "recovered_s": round(time.monotonic() - t0, 2)})
        assert stack.done.wait(timeout=300), "the learner did not finish its run"
        rollout = stack.parts["rollout"].process
        rollout.wait(timeout=120)  # it drains and exits once the learner says done
    finally:
        stack.stopping = True
        supervisor.join(timeout=5)
        watcher.join(timeout=5)
        for c in stack.parts.values():
            if c.process is not None and c.process.poll() is None:
                c.process.terminate()
                c.process.wait(timeout=30)
    (tmp_path / "faults.json").write_text(json.dumps(faults, indent=2))
    print("\nfaults:", json.dumps(faults))
    assert len(faults) >= 10, faults

    # Ledger. Every group produced, as the audit group saw it.
    produced = Counter(g.group_id for g in audited(client, names))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # continued across restarts, never repeated
    trained = [gid for r in records for gid in r["group_ids"]]
    assert len(trained) == len(set(trained))  # nothing trained twice
    # The learner's own record of what it trained (a step killed after its checkpoint, before its
    # metrics line, is in it): a superset of the metrics lines, and all of it was produced.
    trained_set = {m.decode() for m in client.zrange(names.trained, 0, -1)}
    assert set(trained) <= trained_set <= set(produced)
    counters = {k.decode(): int(v) for k, v in client.hgetall(names.counters).items()}
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped:"))
    learner_group = {i["name"].decode(): i for i in client.xinfo_groups(names.trajectories)}["learner"]
    waiting = learner_group["pending"] + (learner_group.get("lag") or 0)
    untrained = sum(produced.values()) - len(trained_set)
    assert untrained <= dropped + waiting, (untrained, counters, waiting)  # none lost without a reason
    ledger = {
        "produced_entries": sum(produced.values()),
        "distinct_groups": len(produced),
        "trained": len(trained_set),
        "waiting": waiting,
        **{k: v for k, v in counters.items() if k.startswith(("dropped:", "dead_letter:"))},
    }
    print("ledger:", json.dumps(ledger))  # fmt: skip
    # Weights: every published version verifies; the last is the last step; versions only grew.
    # Weights: the last version is the last step's; every version kept on disk verifies (older ones
    # are pruned once no rollout reads them); what rollout saw only ever went forward.
    manifest = decode(client.get(names.weights), WeightManifest)
    assert manifest.version == STEPS
    kept = sorted(int(p.name.removeprefix("v")) for p in (run_dir / "weights").glob("v*") if p.is_dir())
    assert kept and kept[-1] == STEPS
    for v in kept:
        assert verify_version(version_dir(run_dir / "weights", v)).version == v
    for series in (anneal_steps, versions):
        assert series and all(a <= b for a, b in itertools.pairwise(series))
    client.close()
    stack.redis.stop()
    # No process left behind, every port free again.
    for c in stack.parts.values():
        proc = stack.redis.process if c.argv is None else c.process
        assert proc is not None and proc.poll() is not None, c.name
    for port in [*ports.values(), stack.redis.port]:
        with socket.socket() as s:  # as a restarted server binds: only a live listener or holder fails it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    print("restarts:", {c.name: c.restarts for c in stack.parts.values()})


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False
