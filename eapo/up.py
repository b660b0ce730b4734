"""``eapo up``: the whole loop on one machine, every service a real process.

Bootstraps the tiny world, starts a private Redis (unless ``REDIS_URL``/``redis.url``), one CPU
expert server per checkpoint of ``expert_server.pool``, the gateway, the learner and one rollout
replica; waits for health; prints progress from the learner's metrics; and stops everything — after
the learner's last step, on failure, or on Ctrl-C. The run directory gets the resolved config,
metrics.jsonl, per-process logs, the weight versions and summary.json.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eapo.config import EAPOConfig, ExpertBackend
from eapo.redis_server import RedisServer, free_port, resolve_redis_url
from eapo.world.bootstrap import bootstrap

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    health_url: str | None = None


def _spawn(name: str, role: str, config: Path, logs: Path, env: dict[str, str]) -> Child:
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    full_env = {**os.environ, "EAPO_ROLE": name, "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eapo.cli", role, "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,
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


def _wait_healthy(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.health_url is None:
            continue
        while not http_ok(child.health_url):
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode} before it was healthy")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not healthy at {child.health_url} after {timeout_s:.0f}s")
            time.sleep(0.2)


def _stop(children: list[Child], timeout_s: float = 30.0) -> None:
    """SIGTERM in reverse start order, then SIGKILL what has not exited by the deadline."""
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in reversed(children):
        try:
            child.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()


def _print_progress(metrics: Path, shown: int, total: int) -> int:
    if not metrics.exists():
        return shown
    lines = metrics.read_text().splitlines()
    for line in lines[shown:]:
        m = json.loads(line)
        print(
            f"[eapo up] step {m['step']:>3}/{total}  loss {m['loss']:+.4f}  acc {m['accuracy']:.2f}  "
            f"calls/ep {m['calls_per_episode']:.2f}  accepted {m['accepted_rate']:.2f} (p={m['acceptance']:.2f})  "
            f"B={m['budget']}  λ={m['penalty']:.3f}  lag {m['version_lag_mean']:.1f}  {m['time_s']:.0f}s",
            flush=True,
        )
    return len(lines)


def _interrupt(signum: int, frame: object) -> None:
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


def spawn_expert_pool(resolved: EAPOConfig, config_file: Path, logs: Path) -> list[Child]:
    """One expert server per checkpoint of ``expert_server.pool``, all under one served name, and the
    gateway in front of them (ports from ``resolve_ports``)."""
    children = []
    for i, (checkpoint, backend) in enumerate(zip(resolved.expert_server.pool, resolved.gateway.backends, strict=True)):
        port = backend.url.rsplit(":", 1)[1]
        env = {
            "EAPO_EXPERT_SERVER__PORT": port,
            "EAPO_EXPERT_SERVER__MODEL_PATH": str(resolved.world.dir / checkpoint),
            "OMP_NUM_THREADS": "1",
        }
        child = _spawn(f"expert-{i}", "expert-server", config_file, logs, env)
        child.health_url = f"{backend.url}/health"
        children.append(child)
    gateway = _spawn("gateway", "gateway", config_file, logs, resolved.secret_env())
    gateway.health_url = f"{resolved.rollout.gateway_url}/readyz"
    return [*children, gateway]


@contextmanager
def expert_pool(cfg: EAPOConfig) -> Iterator[EAPOConfig]:
    """The expert servers and the gateway, healthy, for work outside a training run (the baselines of
    ``eapo experiment``); yields the config that points at them. Logs go to ``cfg.run_dir/logs``."""
    resolved = resolve_ports(cfg)
    config_file = cfg.run_dir / "pool-config.yaml"
    resolved.dump_yaml(config_file)
    children = spawn_expert_pool(resolved, config_file, cfg.run_dir / "logs")
    try:
        _wait_healthy(children, timeout_s=120)
        yield resolved
    finally:
        _stop(children)


def run_stack(cfg: EAPOConfig, config_path: Path | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stack as cleanly as Ctrl-C does
    t0 = time.monotonic()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.jsonl").exists():
        raise SystemExit(f"{run_dir} already holds a run; choose another run_dir (EAPO_RUN_DIR=...)")
    print(f"[eapo up] run directory {run_dir}", flush=True)
    print("[eapo up] bootstrapping the tiny world (cached after the first run)…", flush=True)
    bootstrap(cfg.world)

    redis_server = None
    url = resolve_redis_url(cfg.redis.url)
    if url is None:
        redis_server = RedisServer(run_dir / "redis").start()
        url = redis_server.url
        print(f"[eapo up] private Redis ({redis_server.executable}) on {url}", flush=True)
    resolved = resolve_ports(cfg)
    resolved.redis.url = url
    config_file = run_dir / "config.yaml"
    resolved.dump_yaml(config_file)

    logs = run_dir / "logs"
    children: list[Child] = []
    code = 1
    try:
        children += spawn_expert_pool(resolved, config_file, logs)
        _wait_healthy(children, timeout_s=120)
        print(f"[eapo up] experts and gateway healthy ({time.monotonic() - t0:.0f}s)", flush=True)
        learner = _spawn("learner", "learner", config_file, logs, cfg.secret_env())
        rollout = _spawn("rollout-0", "rollout", config_file, logs, {"OMP_NUM_THREADS": "1", **cfg.secret_env()})
        children += [learner, rollout]
        shown = 0
        while learner.process.poll() is None:
            for child in children:
                code_now = child.process.poll()
                drained = child is rollout and code_now == 0  # it saw the learner's done flag first
                if child is not learner and code_now is not None and not drained:
                    raise RuntimeError(
                        f"{child.name} exited early with code {child.process.returncode}; "
                        f"see {logs / (child.name + '.log')}"
                    )
            shown = _print_progress(run_dir / "metrics.jsonl", shown, cfg.learner.steps)
            time.sleep(0.5)
        _print_progress(run_dir / "metrics.jsonl", shown, cfg.learner.steps)
        if learner.process.returncode != 0:
            raise RuntimeError(f"learner exited with code {learner.process.returncode}; see {logs / 'learner.log'}")
        rollout.process.wait(timeout=120)  # it drains and exits once the learner says done
        code = 0
    except KeyboardInterrupt:
        print("[eapo up] interrupted: stopping every process", flush=True)
        code = 130
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"[eapo up] failed: {exc}", file=sys.stderr, flush=True)
    finally:
        _stop(children)
        if redis_server is not None:
            redis_server.stop()
    exit_codes = {c.name: c.process.returncode for c in children}
    clean = all(rc == 0 or rc == -signal.SIGTERM for rc in exit_codes.values())
    summary = {
        "ok": code == 0 and clean,
        "steps": cfg.learner.steps,
        "seconds": round(time.monotonic() - t0, 1),
        "final_weights": str(resolved.weights_dir / f"v{cfg.learner.steps:06d}") if code == 0 else None,
        "exit_codes": exit_codes,
        "config": str(config_file),
        "source_config": str(config_path) if config_path else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[eapo up] {'done' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f}s; "
        f"exit codes {exit_codes}; summary at {run_dir / 'summary.json'}",
        flush=True,
    )
    return 0 if summary["ok"] else (code or 1)
