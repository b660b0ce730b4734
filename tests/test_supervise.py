"""The supervisor of ``eapo up`` and the chaos suite, on real short-lived processes, and the guard
that keeps ``eapo up --resume`` from continuing a run under a config that would break it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import wait_for

from eapo.core.config import EAPOConfig, SupervisionConfig
from eapo.dev.supervise import Component, RestartBudgetSpent, Supervisor, popen_child
from eapo.dev.up import config_changes, pinned_cores, trained_steps


def exits(code: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"])


def check_until(sup: Supervisor, predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        sup.check()
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_crashing_component_is_restarted_with_growing_backoff_until_its_budget_is_spent():
    events: list[str] = []
    starts: list[float] = []

    def start() -> subprocess.Popen[bytes]:
        starts.append(time.monotonic())
        return exits(3)

    sup = Supervisor(SupervisionConfig(max_restarts=3, backoff_s=0.2, backoff_max_s=0.3), on_event=events.append)
    sup.add(Component("worker", start))
    with pytest.raises(RestartBudgetSpent) as spent:
        check_until(sup, lambda: False)
    assert spent.value.name == "worker" and spent.value.returncode == 3 and spent.value.restarts == 3
    assert len(starts) == 4  # the first start and three restarts
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.3 and gaps[2] >= 0.3  # doubled, then capped (lower bounds only)
    assert "worker exited with code 3; restarting in 0.2s" in events
    assert "restarting worker (restart 3 of 3)" in events


def test_a_finished_component_is_not_restarted_and_a_healthy_run_resets_the_backoff():
    events: list[str] = []
    sup = Supervisor(SupervisionConfig(max_restarts=0), on_event=events.append)
    done = sup.add(Component("learner", lambda: exits(0), finished=lambda code: code == 0))
    check_until(sup, lambda: done.done)
    assert done.restarts == 0 and events == []

    clock = [0.0]
    sup = Supervisor(SupervisionConfig(backoff_s=1, reset_after_s=10), on_event=events.append, clock=lambda: clock[0])
    flaky = sup.add(Component("expert", lambda: exits(1)))
    flaky.process.wait()
    sup.check()  # crash 1 right after its start: 1 s
    clock[0] = 1.0
    sup.check()  # restarted at t=1
    flaky.process.wait()
    sup.check()  # crash 2 in a row: 2 s
    assert flaky.restart_at == 3.0
    clock[0] = 3.0
    sup.check()  # restarted at t=3, then stays up past reset_after_s
    flaky.process.wait()
    clock[0] = 20.0
    sup.check()
    assert flaky.restart_at == 21.0  # back to the first back-off


def test_stop_all_terminates_every_process_and_restarts_nothing():
    sup = Supervisor(SupervisionConfig(backoff_s=0))
    sleeper = sup.add(
        Component("sleeper", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
    )
    sup.stop_all(timeout_s=30)
    assert sleeper.process.returncode is not None
    sup.check()
    assert sleeper.restarts == 0


def test_resume_refuses_a_changed_model_and_accepts_a_longer_run():
    stored = {
        "run_dir": "runs/a",
        "log_level": "INFO",
        "redis": {"url": "redis://127.0.0.1:1/0", "prefix": "eapo"},
        "gateway": {"port": 1, "backends": [{"url": "http://127.0.0.1:2"}]},
        "learner": {"steps": 20, "lr": 1e-6},
    }
    same_but_resolved = stored | {"redis": {"url": None, "prefix": "eapo"}, "gateway": {"port": 9, "backends": []}}
    assert config_changes(stored, same_but_resolved) == ([], [])
    longer = stored | {"learner": {"steps": 60, "lr": 1e-6}, "log_level": "DEBUG"}
    assert config_changes(stored, longer) == (["learner.steps: 20 -> 60", "log_level: 'INFO' -> 'DEBUG'"], [])
    other = stored | {"learner": {"steps": 20, "lr": 1e-5}, "redis": {"url": None, "prefix": "other"}}
    accepted, refused = config_changes(stored, other)
    assert accepted == [] and refused == ["learner.lr: 1e-06 -> 1e-05", "redis.prefix: 'eapo' -> 'other'"]


def test_a_pinned_child_and_every_thread_it_starts_run_on_its_cores_only():
    script = (
        "import os, threading, json; seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0)))); t.start(); t.join()\n"
        "print(json.dumps([sorted(os.sched_getaffinity(0)), seen[0]]))"
    )
    core = min(os.sched_getaffinity(0))
    child = popen_child([sys.executable, "-c", script], cpus=[core], stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=60)
    assert json.loads(out) == [[core], [core]]


def test_cpu_affinity_is_chosen_by_the_longest_matching_name_prefix():
    affinity = {"rollout": [0], "rollout-1": [1], "expert": [0, 1]}
    assert pinned_cores(affinity, "rollout-0") == [0]
    assert pinned_cores(affinity, "rollout-1") == [1]
    assert pinned_cores(affinity, "expert-3") == [0, 1]
    assert pinned_cores(affinity, "learner") is None


def test_a_child_gets_its_death_signal_when_its_parent_is_killed(tmp_path):
    """``eapo experiment``'s workers ask for SIGTERM on their parent's death: a SIGKILLed parent, which
    cannot stop them, still leaves none running. A middle process starts the child and is killed."""
    stopped = tmp_path / "stopped"
    child = (
        "import signal, sys, time\n"
        "from eapo.dev.supervise import signal_on_parent_death\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(stopped)!r}, 'w').close(), sys.exit(0)))\n"
        "signal_on_parent_death(signal.SIGTERM)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    middle = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True)\n"
        "print(child.stdout.readline().strip(), child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True)
    ready, pid = parent.stdout.readline().split()  # blocks until the child has asked
    try:
        assert ready == "ready" and not stopped.exists()
        parent.kill()
        parent.wait(timeout=60)
        wait_for(stopped.exists, 60, "the child's death signal after its parent was killed")
    finally:
        parent.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)  # a failed test leaves no child sleeping


def test_a_learner_is_done_by_its_checkpoint_not_its_metrics_line(tmp_path):
    """A learner killed between step 14's checkpoint and its metrics line (Redis killed as it published,
    beside stress-ng) resumes at 14 and exits 0 with metrics.jsonl ending at 13: the run is finished."""
    cfg = EAPOConfig(run_dir=tmp_path, learner={"steps": 14})
    assert trained_steps(cfg) == 0  # nothing trained yet
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 14)))
    cfg.checkpoint_dir.mkdir()
    (cfg.checkpoint_dir / "latest").write_text("step000013")
    assert trained_steps(cfg) == 13
    (cfg.checkpoint_dir / "latest").write_text("step000014")
    assert trained_steps(cfg) == cfg.learner.steps
