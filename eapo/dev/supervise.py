"""Restart what dies, as Kubernetes would: one supervisor for ``eapo up`` and the chaos suite.

A component is a process and the way to start it again. A component that exits without being
*finished* (what finished means is the component's: the learner or a rollout replica exiting 0 after
the run's last step) is restarted after a back-off that doubles with each crash in a row (reset
once it stays up ``reset_after_s``), up to ``max_restarts`` restarts per component. Past that budget the
supervisor raises ``RestartBudgetSpent``: the caller stops the run cleanly and says how to resume it.
Every start, exit and restart is reported through ``on_event`` (progress lines, logs).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eapo.core.config import SupervisionConfig

log = logging.getLogger(__name__)


class RestartBudgetSpent(RuntimeError):
    """A component crashed more often than ``max_restarts`` allows."""

    def __init__(self, name: str, restarts: int, returncode: int | None):
        super().__init__(f"{name} exited with code {returncode} after {restarts} restarts: restart budget spent")
        self.name, self.restarts, self.returncode = name, restarts, returncode


def signal_on_parent_death(sig: signal.Signals = signal.SIGKILL) -> bool:
    """In the child: ``sig`` when the thread that started it dies (Linux PR_SET_PDEATHSIG), so a SIGKILLed
    ``eapo up`` leaves no learner training unsupervised on a stale Redis, nor ``eapo experiment`` a run.
    Whether the kernel took it (not on other systems). Logs nothing: it runs between fork and exec."""
    PR_SET_PDEATHSIG = 1
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def popen_child(
    argv: list[str], *, die_with_parent: bool = False, cpus: list[int] | None = None, **kwargs: object
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen``, optionally tied to this process's life (see ``signal_on_parent_death``) and pinned to
    ``cpus`` (set before exec, so every thread the child starts inherits it).
    The death signal follows the thread that forks: call it from a thread that outlives the child."""

    def setup() -> None:
        if die_with_parent:
            signal_on_parent_death()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(argv, preexec_fn=setup if die_with_parent or cpus else None, **kwargs)  # type: ignore[call-overload]


@dataclass(eq=False)
class Component:
    """One supervised process. ``start`` returns the new process; ``finished(returncode)`` says an exit
    is the end of its work rather than a crash."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    finished: Callable[[int], bool] = lambda returncode: False
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crashes_in_a_row: int = 0
    started_at: float = 0.0
    restart_at: float | None = None  # a restart is scheduled for this (clock) time
    done: bool = False


@dataclass
class Supervisor:
    """Restarts crashed components with back-off within a budget; ``check`` is one pass, ``run`` loops."""

    config: SupervisionConfig = field(default_factory=SupervisionConfig)
    on_event: Callable[[str], None] = log.warning
    clock: Callable[[], float] = time.monotonic
    components: dict[str, Component] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, component: Component) -> Component:
        """Register and start ``component``."""
        self.components[component.name] = component
        self._start(component)
        return component

    def _start(self, c: Component) -> None:
        c.process, c.started_at, c.restart_at = c.start(), self.clock(), None

    def alive(self, name: str) -> bool:
        process = self.components[name].process
        return process is not None and process.poll() is None

    def check(self) -> None:
        """Notice exits, schedule restarts with back-off, start those that are due. Raises
        ``RestartBudgetSpent`` when a component crashes once more than its budget allows."""
        with self.lock:
            now = self.clock()
            for c in self.components.values():
                if c.done or c.process is None:
                    continue
                if c.restart_at is not None:
                    if now >= c.restart_at:
                        c.restarts += 1
                        self.on_event(f"restarting {c.name} (restart {c.restarts} of {self.config.max_restarts})")
                        try:
                            self._start(c)
                        except Exception as exc:  # a failed start is one more crash
                            self.on_event(f"{c.name} failed to start: {exc}")
                            c.started_at, c.restart_at = now, None  # the exited process is seen again below
                    continue
                code = c.process.poll()
                if code is None:
                    continue
                if c.finished(code):
                    c.done = True
                    continue
                if c.restarts >= self.config.max_restarts:
                    raise RestartBudgetSpent(c.name, c.restarts, code)
                if now - c.started_at >= self.config.reset_after_s:
                    c.crashes_in_a_row = 0
                delay = min(self.config.backoff_s * 2**c.crashes_in_a_row, self.config.backoff_max_s)
                c.crashes_in_a_row += 1
                c.restart_at = now + delay
                self.on_event(f"{c.name} exited with code {code}; restarting in {delay:.1f}s")

    def run(self, stop: threading.Event, interval_s: float = 0.1) -> None:
        """``check`` until ``stop`` is set (for a supervising thread)."""
        while not stop.wait(interval_s):
            self.check()

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGTERM in reverse start order, then SIGKILL whatever has not exited by the deadline."""
        with self.lock:
            running = [c.process for c in reversed(self.components.values()) if c.process is not None]
            for c in self.components.values():
                c.done = True  # nothing is restarted from now on
        terminate(running, timeout_s)


def terminate(processes: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM each process still running, then SIGKILL those not gone by the deadline; reaps all."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in processes:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop in time; killing it", p.pid)
            with contextlib.suppress(ProcessLookupError):  # a session leader takes what it started with it
                os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else p.kill()
            p.wait()
