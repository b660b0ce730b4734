"""The real stack the chaos and end-to-end tests run: a config file on the fast test world, the processes
(``eapo <role>`` or ``eapo up`` itself, each logging to a file), the Redis they share, and what the run
leaves behind (metrics, weights, ports). The ``stack`` fixture (``conftest.py``) hands a test one and
stops whatever it started, passed or failed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml
from helpers import assert_ledger, start_audit, wait_for

from eapo.core.config import WorldConfig
from eapo.dev.redis_server import RedisServer
from eapo.dev.supervise import popen_child, terminate
from eapo.dev.up import http_ok
from proto import Names

# What every run on the test world shares. The barely trained world never solves a problem: its
# zero-signal groups are kept, and a consultation penalty from step 0 gives them an advantage (the
# plumbing, not learning, is under test); short turns keep the steps quick. One expert server instead
# of the default two: each process a stack starts costs ~10 s of a core (the chaos suite, which starts
# its own, keeps two behind the gateway).
TEST_RUN: dict[str, Any] = {
    "expert_server": {"pool": ["expert"]},
    "learner": {"batch_groups": 2, "dynamic_sampling": False},
    "rollout": {"max_new_tokens": 32},
    "anneal": {"penalty": {"kind": "constant", "start": 0.1, "end": 0.1}},
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (neither is modified)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def port_free(port: int) -> bool:
    """True if a server could bind ``port`` now, as a restarted one would (only a live listener or holder
    of the port stops it; connections left in TIME_WAIT do not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


class Stack:
    """One run's files under ``root`` (``config.yaml``, ``run/``, ``logs/``), the processes started for it
    and the Redis it uses (``use_redis``: a running one; ``private_redis``: this stack's own)."""

    def __init__(self, world: WorldConfig, root: Path, prefix: str):
        self.world, self.root, self.prefix, self.names = world, Path(root), prefix, Names(prefix)
        self.config, self.run_dir, self.logs = self.root / "config.yaml", self.root / "run", self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread each: the stack shares a few cores
        self.redis_server: RedisServer | None = None
        self._client: redis.Redis | None = None
        self._logs: dict[subprocess.Popen[bytes], Path] = {}

    # The config file.
    def write(self, **sections: Any) -> Path:
        """Write the run's config: the test world, this stack's run dir and Redis prefix, ``TEST_RUN``, and
        ``sections`` merged over them."""
        world = self.world.model_dump(mode="json")
        own = {"run_dir": str(self.run_dir), "world": world, "redis": {"prefix": self.prefix}}
        self.config.write_text(yaml.safe_dump(merged(merged(own, TEST_RUN), sections)))
        return self.config

    def settings(self) -> dict[str, Any]:
        """The config file as it is now."""
        return yaml.safe_load(self.config.read_text())

    def update(self, **sections: Any) -> None:
        """Merge ``sections`` into the config file as it is now (processes read it when they start)."""
        self.config.write_text(yaml.safe_dump(merged(self.settings(), sections)))

    def resolved(self) -> dict[str, Any]:
        """The config ``eapo up`` resolved and stored in the run dir (ports, Redis URL)."""
        return yaml.safe_load((self.run_dir / "config.yaml").read_text())

    # Redis.
    def use_redis(self, url: str, *, pass_on: bool = True) -> redis.Redis:
        """The Redis at ``url``: the test's client of it (returned, and ``client``), and, with ``pass_on``,
        the ``REDIS_URL`` of every process started from now on (off for one the processes find without
        it, such as the private Redis of ``eapo up``)."""
        if self._client is not None:
            self._client.close()
        self._client = redis.Redis.from_url(url)
        if pass_on:
            self.env["REDIS_URL"] = url
        return self._client

    def private_redis(self) -> RedisServer:
        """A Redis server of this stack's own (append-only file under ``root/redis``), stopped on close."""
        self.redis_server = RedisServer(self.root / "redis").start()
        self.use_redis(self.redis_server.url)
        return self.redis_server

    @property
    def client(self) -> redis.Redis:
        assert self._client is not None, "no Redis yet: use_redis or private_redis first"
        return self._client

    def audit(self) -> None:
        """Start the audit consumer group (``helpers.start_audit``): before anything is produced."""
        start_audit(self.client, self.names)

    def ledger(self, steps: int, client: redis.Redis | None = None) -> dict:
        """The chaos suite's ledger (``helpers.assert_ledger``) of a run that ended at ``steps``."""
        return assert_ledger(client or self.client, self.names, self.run_dir / "metrics.jsonl", steps)

    # Processes.
    def start(
        self,
        role: str,
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
        session: bool = False,
    ) -> subprocess.Popen[bytes]:
        """``eapo <role> --config <config>`` (or ``argv``) with the stack's environment and ``env``, its output
        appended to ``logs/<name>.log``. Started from the main thread, it is SIGKILLed if this process dies
        (from another thread that guard would fire when the thread ends, so it is left off)."""
        name = name or role
        argv = argv or [sys.executable, "-m", "eapo.cli", role, "--config", str(self.config)]
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = popen_child(
                argv,
                env={**os.environ, **self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=session,
                die_with_parent=threading.current_thread() is threading.main_thread(),
            )
        self._logs[proc] = log
        return proc

    @contextmanager
    def up(self, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
        """``eapo up <args>`` (default: this stack's config) in its own process group, as a shell would start
        it, logging to ``logs/up.log``. Whatever of it still runs when the block ends is SIGKILLed (its
        children die with it)."""
        argv = [sys.executable, "-m", "eapo.cli", "up", *(args or ("--config", str(self.config)))]
        proc = self.start("up", argv=argv, env=env, session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def output(self, proc: subprocess.Popen[bytes], tail: int | None = None) -> str:
        """What ``proc`` wrote (its log holds every earlier process of the same name too)."""
        text = self._logs[proc].read_text(errors="replace")
        return text[-tail:] if tail else text

    def finish(self, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
        """Wait for ``proc`` to exit, assert it exited 0; returns its output."""
        code = proc.wait(timeout=timeout_s)
        assert code == 0, f"{self._logs[proc].stem} exited with {code}:\n{self.output(proc, 4000)}"
        return self.output(proc)

    def wait(
        self, predicate: Callable[[], bool], timeout_s: float, what: str, *, alive: tuple = (), interval_s: float = 0.1
    ) -> None:
        """``helpers.wait_for``, failing at once (with its output) if a process of ``alive`` exits meanwhile."""

        def check() -> bool:
            for p in alive:
                assert p.poll() is None, f"{what}: exited with {p.returncode} first:\n{self.output(p, 4000)}"
            return predicate()

        wait_for(check, timeout_s, what, interval_s)

    def wait_http(self, url: str, timeout_s: float = 120, *, alive: tuple = ()) -> None:
        self.wait(lambda: http_ok(url), timeout_s, f"{url} answering", alive=alive, interval_s=0.2)

    # What the run leaves.
    def metrics(self) -> list[dict]:
        """The learner's records so far (``run/metrics.jsonl``), one a step."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def last_step(self) -> int:
        records = self.metrics()
        return records[-1]["step"] if records else 0

    def close(self) -> None:
        """Stop every process still running (SIGTERM, then SIGKILL), the private Redis last."""
        terminate([p for p in reversed(self._logs) if p.poll() is None], timeout_s=30)
        if self._client is not None:
            self._client.close()
        if self.redis_server is not None:
            self.redis_server.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
