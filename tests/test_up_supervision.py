"""``eapo up`` survives its processes dying, and ``eapo up --resume`` finishes a run whose ``eapo up``
was killed whole or spent its restart budget. Real processes throughout (private Redis with its
append-only file, expert servers, gateway, learner, rollout); the ledger of the chaos suite must hold
afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from helpers import running, wait_for
from stack import Stack, ping

from eapo.dev.redis_server import RedisServer
from learner.checkpoints import latest_step

pytestmark = pytest.mark.e2e


def pids(run_dir: Path) -> dict[str, int]:
    path = run_dir / "processes.json"
    return json.loads(path.read_text()) if path.exists() else {}


@contextmanager
def audited_up(stack: Stack, steps: int) -> Iterator[subprocess.Popen[bytes]]:
    """A run of ``steps`` under ``eapo up``, its private Redis audited from before its first group."""
    stack.write(
        learner={"steps": steps, "max_staleness": 1, "keep_versions": 3},
        rollout={"group_size": 4, "max_groups_in_flight": 2},
    )
    with stack.up() as proc:
        run_dir = stack.run_dir
        resolved = run_dir / "config.yaml"
        stack.wait(lambda: resolved.exists() and "redis" in pids(run_dir), 300, "private Redis", alive=(proc,))
        url = stack.resolved()["redis"]["url"]
        stack.wait(lambda: ping(url), 60, "Redis answering", alive=(proc,))
        stack.use_redis(url, pass_on=False)
        stack.audit()
        assert stack.client.xlen(stack.names.trajectories) == 0, "groups were produced before the audit began"
        yield proc


def ledger_after(stack: Stack, steps: int) -> dict:
    """The ledger, read from the run's Redis replayed from its append-only file (``eapo up`` stopped it)."""
    with RedisServer(stack.run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        try:
            return stack.ledger(steps, client)
        finally:
            client.close()


@pytest.mark.timeout(1500)
def test_a_run_outlives_its_own_kill_a_spent_budget_and_killed_processes_and_finishes(stack):
    """One run through every way ``eapo up`` can be stopped, in the order a user might meet them:
    ``eapo up`` killed whole; a plain restart and a resume with a changed setting refused; a resume
    without restarts stopped cleanly at the first crash; a last resume whose learner, rollout replica
    and Redis are SIGKILLed in turn, each restarted, and which then finishes on its own. (One run
    rather than one per case: each start of the stack costs about 25 s of a 2-core machine.)"""
    steps, run_dir = 14, stack.run_dir
    with audited_up(stack, steps) as proc:
        stack.wait(lambda: stack.last_step() >= 2, 300, "step 2", alive=(proc,))
        children = pids(run_dir)
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its group: no clean stop of anything
        proc.wait()
    # Its children die with it (they are in sessions of their own, so not through the group).
    wait_for(lambda: not any(map(running, children.values())), 60, "every child of the killed eapo up gone")
    stopped_at = stack.last_step()
    assert stopped_at < steps
    durable = latest_step(run_dir / "checkpoints")  # what a resume says it continues from
    assert durable in (stopped_at, stopped_at + 1)  # the log line of the newest checkpoint may be lost

    again = subprocess.run(
        [sys.executable, "-m", "eapo.cli", "up", "--config", str(stack.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0 and f"eapo up --resume {run_dir}" in again.stderr, again.stderr
    changed = subprocess.run(
        [sys.executable, "-m", "eapo.cli", "up", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EAPO_LEARNER__LR": "0.5"},
    )
    assert changed.returncode != 0 and "learner.lr: " in changed.stderr and "-> 0.5" in changed.stderr, changed.stderr

    # Resumed with no restarts allowed (a safe change), it stops cleanly at the first crash and says how
    # to go on.
    with stack.up("--resume", str(run_dir), env={"EAPO_SUPERVISION__MAX_RESTARTS": "0"}) as strict:
        stack.wait(lambda: stack.last_step() > stopped_at, 300, "a step after resuming", alive=(strict,))
        os.kill(pids(run_dir)["learner"], signal.SIGKILL)
        assert strict.wait(timeout=120) == 3, stack.output(strict, 4000)
    out = stack.output(strict)  # the log holds every launch so far; a SIGKILLed one printed no hint
    assert f"resuming {run_dir} after step {durable}" in out
    assert "resuming with a changed setting: supervision.max_restarts: 5 -> 0" in out
    assert "learner exited with code -9 after 0 restarts: restart budget spent" in out
    assert out.count(f"resume with: eapo up --resume {run_dir}") == 1
    assert not any(map(running, pids(run_dir).values()))  # stopped cleanly: nothing left running

    # Resumed again, with restarts: its learner, replica and Redis die in turn, and it finishes on its own.
    earlier, resumed_at = pids(run_dir), stack.last_step()
    with stack.up("--resume", str(run_dir), env={"EAPO_SUPERVISION__MAX_RESTARTS": "5"}) as resumed:
        stack.wait(lambda: stack.last_step() > resumed_at, 300, "a step after resuming again", alive=(resumed,))
        for victim in ("learner", "rollout-0", "redis"):
            stack.wait(
                lambda v=victim: pids(run_dir).get(v) not in (None, earlier.get(v)), 300, f"{victim} running",
                alive=(resumed,),
            )  # fmt: skip
            assert stack.last_step() < steps, "the run ended before every kill: give it more steps"
            old = pids(run_dir)[victim]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda o=old, v=victim: pids(run_dir).get(v) not in (None, o), 120, f"{victim} restarted")
            # …and the run moves on with it: a step after the restart
            at = stack.last_step()
            wait_for(lambda a=at: resumed.poll() is not None or stack.last_step() > a, 300, f"a step after {victim}")
        out = stack.finish(resumed, timeout_s=600)[len(out) :]
    for victim in ("learner", "rollout-0", "redis"):
        assert f"{victim} exited with code -9; restarting in" in out, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["resumed"], summary
    assert all(summary["restarts"][v] >= 1 for v in ("learner", "rollout-0", "redis")), summary
    print("ledger:", json.dumps(ledger_after(stack, steps)), "restarts:", summary["restarts"])
