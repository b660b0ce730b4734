"""``eapo up``: the whole loop on one machine, every service a real process, supervised.

Bootstraps the tiny world, starts a private Redis (unless ``REDIS_URL``/``redis.url``), one CPU
expert server per checkpoint of ``expert_server.pool`` and the gateway, then (those healthy) the learner
and one rollout replica; prints progress from the learner's metrics; restarts whatever dies
(``eapo.dev.supervise``: back-off, a restart budget); and stops everything — after the learner's last
step, when a restart budget is spent, or on Ctrl-C. The run directory gets the resolved config,
metrics.jsonl, per-process logs (``logs/up.log``: what the supervisor did), the weight versions and
summary.json. ``eapo up --resume RUN_DIR`` continues a run that stopped or was killed: the same
config, the private Redis replayed from its append-only file, the learner from its newest checkpoint,
the rollout re-reading the prompts it held.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eapo.core.config import EAPOConfig, ExpertBackend, load_config
from eapo.core.files import write_atomic
from eapo.core.net import free_port
from eapo.dev.redis_server import RedisServer
from eapo.dev.supervise import Component, RestartBudgetSpent, Supervisor, popen_child, terminate
from eapo.dev.world.bootstrap import bootstrap
from learner.checkpoints import latest_step
from proto.weights import version_dir

log = logging.getLogger(__name__)

# Keys ``eapo up`` resolves afresh at every start (ports, the private Redis's address): never a change.
RESOLVED_KEYS = ("run_dir", "redis.url", "gateway.port", "gateway.backends", "rollout.gateway_url")
# Keys a resumed run may change: they bound the run or say how to watch it, not what it trains.
SAFE_KEYS = ("log_level", "learner.steps", "learner.keep_versions", "learner.keep_checkpoints", "supervision")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    health_url: str | None = None


def pinned_cores(affinity: dict[str, list[int]], name: str) -> list[int] | None:
    """The cores ``supervision.cpu_affinity`` gives process ``name`` (by its longest matching prefix)."""
    prefixes = sorted((p for p in affinity if name.startswith(p)), key=len, reverse=True)
    return affinity[prefixes[0]] if prefixes else None


def _spawn(name: str, role: str, config: Path, logs: Path, env: dict[str, str], cpus: list[int] | None = None) -> Child:
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    full_env = {**os.environ, "EAPO_ROLE": name, "PYTHONUNBUFFERED": "1", **env}
    if cpus and "OMP_NUM_THREADS" not in env:  # a thread per core it may use, unless the role sets its own
        full_env["OMP_NUM_THREADS"] = str(len(cpus))
    proc = popen_child(
        [sys.executable, "-m", "eapo.cli", role, "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,  # Ctrl-C reaches ``eapo up`` only, which stops the children in order
        die_with_parent=True,
        cpus=cpus,
    )
    out.close()
    return Child(name, proc)


def http_ok(url: str) -> bool:
    """True if a GET of ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait_healthy(urls: dict[str, str], timeout_s: float, tick: Callable[[str], None]) -> None:
    """Until every URL answers 200; ``tick(name)`` runs between tries (it raises if ``name`` is gone for
    good, or lets the supervisor restart it)."""
    deadline = time.monotonic() + timeout_s
    for name, url in urls.items():
        while not http_ok(url):
            tick(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy at {url} after {timeout_s:.0f}s")
            time.sleep(0.2)


def _exited(children: list[Child]) -> Callable[[str], None]:
    by_name = {c.name: c for c in children}

    def tick(name: str) -> None:
        if by_name[name].process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {by_name[name].process.returncode} before it was healthy")

    return tick


def _stop(children: list[Child], timeout_s: float = 30.0) -> None:
    """SIGTERM in reverse start order, then SIGKILL what has not exited by the deadline."""
    terminate([c.process for c in reversed(children)], timeout_s)


def _print_progress(metrics: Path, shown: int, total: int) -> int:
    if not metrics.exists():
        return shown
    text = metrics.read_text()
    lines = text.splitlines()[: text.count("\n")]  # a line still being written is shown once it is whole
    for line in lines[shown:]:
        m = json.loads(line)
        print(
            f"[eapo up] step {m['step']:>3}/{total}  loss {m['loss']:+.4f}  acc {m['accuracy']:.2f}  "
            f"calls/ep {m['calls_per_episode']:.2f}  accepted {m['accepted_rate']:.2f} (p={m['acceptance']:.2f})  "
            f"B={m['budget']}  λ={m['penalty']:.3f}  lag {m['version_lag_mean']:.1f}  {m['time_s']:.0f}s",
            flush=True,
        )
    return len(lines)


def interrupt(signum: int, frame: object) -> None:
    """A signal handler that stops like Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def resolve_ports(cfg: EAPOConfig) -> EAPOConfig:
    """A copy of ``cfg`` with free loopback ports for the expert servers and the gateway, wired together."""
    resolved = cfg.model_copy(deep=True)
    resolved.gateway.port = free_port()
    resolved.gateway.backends = [
        ExpertBackend(model=cfg.expert_server.model, url=f"http://127.0.0.1:{free_port()}")
        for _ in cfg.expert_server.pool
    ]
    resolved.rollout.gateway_url = f"http://127.0.0.1:{resolved.gateway.port}"
    return resolved


def expert_pool_specs(resolved: EAPOConfig) -> list[tuple[str, str, dict[str, str], str]]:
    """(name, role, environment, health URL) of one expert server per checkpoint of
    ``expert_server.pool``, all under one served name, and of the gateway in front of them (ports from
    ``resolve_ports``)."""
    specs = []
    for i, (checkpoint, backend) in enumerate(zip(resolved.expert_server.pool, resolved.gateway.backends, strict=True)):
        env = {
            "EAPO_EXPERT_SERVER__PORT": backend.url.rsplit(":", 1)[1],
            "EAPO_EXPERT_SERVER__MODEL_PATH": str(resolved.world.dir / checkpoint),
            "OMP_NUM_THREADS": "1",
        }
        specs.append((f"expert-{i}", "expert-server", env, f"{backend.url}/health"))
    specs.append(("gateway", "gateway", resolved.secret_env(), f"{resolved.rollout.gateway_url}/readyz"))
    return specs


def spawn_expert_pool(resolved: EAPOConfig, config_file: Path, logs: Path) -> list[Child]:
    """The expert servers and the gateway of ``expert_pool_specs``, started (not yet healthy)."""
    children = []
    for name, role, env, url in expert_pool_specs(resolved):
        child = _spawn(name, role, config_file, logs, env)
        child.health_url = url
        children.append(child)
    return children


@contextmanager
def expert_pool(cfg: EAPOConfig) -> Iterator[EAPOConfig]:
    """The expert servers and the gateway, healthy, for work outside a training run (the baselines of
    ``eapo experiment``); yields the config that points at them. Logs go to ``cfg.run_dir/logs``."""
    resolved = resolve_ports(cfg)
    config_file = cfg.run_dir / "pool-config.yaml"
    resolved.dump_yaml(config_file)
    children = spawn_expert_pool(resolved, config_file, cfg.run_dir / "logs")
    try:
        _wait_healthy(
            {c.name: c.health_url for c in children if c.health_url},
            cfg.expert_server.start_timeout_s,
            _exited(children),
        )
        yield resolved
    finally:
        _stop(children)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_changes(stored: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(accepted, refused): the keys whose value differs between a run's stored config and the config
    it is resumed with, each as ``key: old -> new``. Keys ``eapo up`` resolves itself are not changes."""
    old, now = _flatten(stored), _flatten(new)
    accepted, refused = [], []
    for key in sorted(old.keys() | now.keys()):
        if key.startswith(RESOLVED_KEYS) or old.get(key) == now.get(key):
            continue
        line = f"{key}: {old.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        (accepted if key.startswith(SAFE_KEYS) else refused).append(line)
    return accepted, refused


def resume_config(run_dir: Path, config_path: Path | None = None) -> EAPOConfig:
    """The config to resume ``run_dir`` with: its stored config (or ``config_path``), environment
    overrides applied. Refuses (SystemExit) a change that would break the run — a different model,
    data, schedule or stream layout under the same checkpoints and ledger — naming each changed key."""
    stored_file = run_dir / "config.yaml"
    if not stored_file.exists():
        raise SystemExit(f"{run_dir} holds no run to resume (no config.yaml)")
    up_state = run_dir / "up.json"
    if up_state.exists():
        pid = json.loads(up_state.read_text()).get("pid")
        if pid and pid != os.getpid() and _is_eapo_up(pid):
            raise SystemExit(f"{run_dir} is still being run by eapo up (pid {pid}); stop it first")
    cfg = load_config(config_path or stored_file)
    stored = yaml.safe_load(stored_file.read_text()) or {}
    accepted, refused = config_changes(stored, cfg.model_dump(mode="json"))
    if refused:
        raise SystemExit(
            f"refusing to resume {run_dir}: these settings differ from the run's and would break it:\n  "
            + "\n  ".join(refused)
            + f"\n(safe to change: {', '.join(SAFE_KEYS)})"
        )
    for line in accepted:
        print(f"[eapo up] resuming with a changed setting: {line}", flush=True)
    cfg.run_dir = run_dir
    if (run_dir / "redis").is_dir() and not os.environ.get("REDIS_URL"):
        cfg.redis.url = None  # it ran on a private Redis: start it again from its append-only file
    return cfg


def _is_eapo_up(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"up" in cmdline and any(b"eapo" in part for part in cmdline)


def trained_steps(cfg: EAPOConfig) -> int:
    """The learner's durable progress: the step of its newest complete checkpoint. Not the metrics file,
    which is written after the checkpoint (a run that finished between the two was once restarted until its
    budget was spent: seen beside stress-ng, Redis killed)."""
    return latest_step(cfg.checkpoint_dir)


class _Stack:
    """The supervised processes of one ``eapo up``, and the record of them in the run directory."""

    def __init__(self, cfg: EAPOConfig, config_file: Path, supervisor: Supervisor):
        self.cfg, self.config_file, self.supervisor = cfg, config_file, supervisor
        self.logs = cfg.run_dir / "logs"
        self.pids: dict[str, int] = {}

    def add(self, name: str, role: str, env: dict[str, str], finished: Callable[[int], bool] | None = None) -> None:
        def start() -> subprocess.Popen[bytes]:
            cpus = pinned_cores(self.cfg.supervision.cpu_affinity, name)
            return self._started(name, _spawn(name, role, self.config_file, self.logs, env, cpus).process)

        self.supervisor.add(Component(name, start, finished or (lambda code: False)))

    def add_redis(self, server: RedisServer) -> None:
        redis = server.component(die_with_parent=True)
        start = redis.start
        redis.start = lambda: self._started("redis", start())
        self.supervisor.add(redis)

    def _started(self, name: str, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.pids[name] = process.pid
        write_atomic(self.cfg.run_dir / "processes.json", json.dumps(self.pids, indent=2))  # read while it runs
        return process

    def exit_codes(self) -> dict[str, int | None]:
        return {c.name: c.process.returncode for c in self.supervisor.components.values() if c.process is not None}


def run_stack(
    cfg: EAPOConfig, config_path: Path | None = None, resume: bool = False, resume_hint: str | None = None
) -> int:
    """Run (or with ``resume``, continue) the training run of ``cfg`` under supervision; the exit code.
    ``resume_hint``: how to go on after a stop, said with it (default: ``eapo up --resume``)."""
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the stack as cleanly as Ctrl-C does
    # Ctrl-C too when started from a script's background job, which inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.monotonic()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and not resume:
        raise SystemExit(
            f"{run_dir} already holds a run; continue it with `eapo up --resume {run_dir}`, "
            "or choose another run_dir (EAPO_RUN_DIR=...)"
        )
    (run_dir / "up.json").write_text(json.dumps({"pid": os.getpid(), "resumed": resume}))
    resume_hint = resume_hint or f"resume with: eapo up --resume {run_dir}"
    up_log = run_dir / "logs" / "up.log"
    up_log.parent.mkdir(parents=True, exist_ok=True)

    def say(line: str, stream: Any = sys.stdout) -> None:
        print(f"[eapo up] {line}", file=stream, flush=True)
        with open(up_log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    say(f"resuming {run_dir} after step {trained_steps(cfg)}" if resume else f"run directory {run_dir}")
    if cfg.uses_world:  # model.policy, data.train and absolute expert checkpoints need no tiny world
        say("bootstrapping the tiny world (cached after the first run)…")
        bootstrap(cfg.world)

    supervisor = Supervisor(cfg.supervision, on_event=say)
    url = cfg.redis.resolved_url()
    redis_server = None
    if url is None:
        redis_server = RedisServer(run_dir / "redis")
        url = redis_server.url
    resolved = resolve_ports(cfg)
    resolved.redis.url = url
    config_file = run_dir / "config.yaml"
    resolved.dump_yaml(config_file)
    stack = _Stack(resolved, config_file, supervisor)
    # The learner is finished when it exits 0 after its last step; a replica when it exits 0 after that
    # step (it saw the learner's done flag, possibly before the learner itself exited). Any other exit —
    # a crash, or a stop from outside before the end — is restarted.
    finished = lambda code: code == 0 and trained_steps(cfg) >= cfg.learner.steps  # noqa: E731
    code = 1
    try:
        if redis_server is not None:
            stack.add_redis(redis_server)
            say(f"private Redis ({redis_server.executable}) on {url}")
        specs = expert_pool_specs(resolved)
        for name, role, env, _url in specs:
            stack.add(name, role, env)
        _wait_healthy(
            {name: health for name, _, _, health in specs},
            cfg.expert_server.start_timeout_s,
            lambda name: supervisor.check(),
        )
        say(f"experts and gateway healthy ({time.monotonic() - t0:.0f}s)")
        stack.add("learner", "learner", cfg.secret_env(), finished=finished)
        learner = supervisor.components["learner"]
        stack.add("rollout-0", "rollout", {"OMP_NUM_THREADS": "1", **cfg.secret_env()}, finished=finished)
        rollout = supervisor.components["rollout-0"]
        shown = 0
        drain_deadline: float | None = None
        while not (learner.done and rollout.done):
            supervisor.check()
            shown = _print_progress(metrics, shown, cfg.learner.steps)
            if learner.done and drain_deadline is None:
                drain_deadline = time.monotonic() + 120
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                raise RuntimeError("the rollout did not drain within 120s of the learner's last step")
            time.sleep(0.5)
        _print_progress(metrics, shown, cfg.learner.steps)
        code = 0
    except KeyboardInterrupt:
        say(f"interrupted: stopping every process; {resume_hint}")
        code = 130
    except RestartBudgetSpent as exc:
        say(f"stopping: {exc}; see {run_dir / 'logs' / (exc.name + '.log')}; {resume_hint}", sys.stderr)
        code = 3
    except RuntimeError as exc:
        say(f"failed: {exc}; {resume_hint}", sys.stderr)
    finally:
        supervisor.stop_all()
    exit_codes = stack.exit_codes()
    clean = all(rc == 0 or rc == -signal.SIGTERM for rc in exit_codes.values())
    summary = {
        "ok": code == 0 and clean,
        "steps": cfg.learner.steps,
        "seconds": round(time.monotonic() - t0, 1),
        "final_weights": str(version_dir(resolved.weights_dir, cfg.learner.steps)) if code == 0 else None,
        "exit_codes": exit_codes,
        "restarts": {c.name: c.restarts for c in supervisor.components.values()},
        "resumed": resume,
        "config": str(config_file),
        "source_config": str(config_path) if config_path else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(
        f"{'done' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f}s; "
        f"exit codes {exit_codes}; restarts {summary['restarts']}; summary at {run_dir / 'summary.json'}"
    )
    return 0 if summary["ok"] else (code or 1)
