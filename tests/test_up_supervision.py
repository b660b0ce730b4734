"""``eapo up`` survives its processes dying, and ``eapo up --resume`` finishes a run whose ``eapo up``
was killed whole. Real processes throughout (private Redis with its append-only file, expert servers,
gateway, learner, rollout); the ledger of the chaos suite must hold afterwards."""

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
import yaml
from helpers import assert_ledger, start_audit, wait_for

from eapo.dev.redis_server import RedisServer
from proto import Names

pytestmark = pytest.mark.e2e
PREFIX = "up"


def write_config(tiny_world, tmp_path: Path, steps: int) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    path = tmp_path / "config.yaml"
    config = {
        "run_dir": str(run_dir),
        "world": tiny_world.model_dump(mode="json"),
        "redis": {"prefix": PREFIX},
        "learner": {
            "steps": steps,
            "batch_groups": 2,
            "max_staleness": 1,
            "keep_versions": 3,
            "dynamic_sampling": False,  # the barely trained test world: keep zero-signal groups
        },
        "rollout": {"group_size": 4, "max_groups_in_flight": 2, "max_new_tokens": 32},
        # a consultation penalty from step 0 makes groups informative even when no sample is correct
        "anneal": {"penalty": {"kind": "constant", "start": 0.1, "end": 0.1}},
    }
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


@contextmanager
def up(*args: str, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``eapo up`` in its own process group, as a shell would start it; output to ``log``. Whatever of
    it still runs when the block ends is SIGKILLed (its children die with it)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eapo.cli", "up", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pids(run_dir: Path) -> dict[str, int]:
    path = run_dir / "processes.json"
    return json.loads(path.read_text()) if path.exists() else {}


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def audit_from_the_start(run_dir: Path, proc: subprocess.Popen[bytes]) -> redis.Redis:
    """The private Redis's client with the audit group created before any group was produced."""
    config = run_dir / "config.yaml"
    wait_for(lambda: proc.poll() is None and config.exists() and "redis" in pids(run_dir), 300, "private Redis")
    client = redis.Redis.from_url(yaml.safe_load(config.read_text())["redis"]["url"])
    wait_for(lambda: _ping(client), 60, "Redis answering")
    names = Names(PREFIX)
    start_audit(client, names)
    assert client.xlen(names.trajectories) == 0, "groups were produced before the audit began"
    return client


@contextmanager
def audited_up(tiny_world, tmp_path: Path, steps: int) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path, Path]]:
    """A run of ``steps`` under ``eapo up``, audited from its first group: (process, run dir, config, log)."""
    config, run_dir = write_config(tiny_world, tmp_path, steps)
    log = tmp_path / "up.log"
    with up("--config", str(config), log=log) as proc:
        audit_from_the_start(run_dir, proc).close()
        yield proc, run_dir, config, log


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def ledger_after(run_dir: Path, steps: int) -> dict:
    """The ledger, read from the run's Redis replayed from its append-only file (``eapo up`` stopped it)."""
    with RedisServer(run_dir / "redis") as server:
        client = redis.Redis.from_url(server.url)
        try:
            return assert_ledger(client, Names(PREFIX), run_dir / "metrics.jsonl", steps)
        finally:
            client.close()


@pytest.mark.timeout(900)
def test_up_restarts_a_killed_learner_rollout_and_redis_and_finishes(tiny_world, tmp_path):
    steps = 8
    with audited_up(tiny_world, tmp_path, steps) as (proc, run_dir, _config, log):
        for victim in ("learner", "rollout-0", "redis"):
            wait_for(lambda v=victim: proc.poll() is None and v in pids(run_dir), 300, f"{victim} running")
            reached = max(last_step(run_dir), 1)
            wait_for(lambda r=reached: proc.poll() is None and last_step(run_dir) >= r, 300, f"step {reached}")
            old = pids(run_dir)[victim]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda o=old, v=victim: pids(run_dir).get(v) not in (None, o), 120, f"{victim} restarted")
            # …and the run moves on with it: a step after the restart
            at = last_step(run_dir)
            wait_for(lambda a=at: proc.poll() is not None or last_step(run_dir) > a, 300, f"a step after {victim}")
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    out = log.read_text()
    for victim in ("learner", "rollout-0", "redis"):
        assert f"{victim} exited with code -9; restarting in" in out, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and all(summary["restarts"][v] >= 1 for v in ("learner", "rollout-0", "redis")), summary
    print("ledger:", json.dumps(ledger_after(run_dir, steps)), "restarts:", summary["restarts"])


@pytest.mark.timeout(900)
def test_up_killed_whole_or_out_of_restarts_is_finished_by_resume_and_a_changed_config_is_refused(tiny_world, tmp_path):
    steps = 6
    with audited_up(tiny_world, tmp_path, steps) as (proc, run_dir, config, log):
        wait_for(lambda: proc.poll() is None and last_step(run_dir) >= 2, 300, "step 2")
        children = pids(run_dir)
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its group: no clean stop of anything
        proc.wait()
    # Its children die with it (they are in sessions of their own, so not through the group).
    wait_for(lambda: all(gone(pid) for pid in children.values()), 60, "every child of the killed eapo up gone")
    stopped_at = last_step(run_dir)
    assert stopped_at < steps

    again = subprocess.run(
        [sys.executable, "-m", "eapo.cli", "up", "--config", str(config)], capture_output=True, text=True, timeout=120
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
    # to go on; resumed again, it finishes.
    with up("--resume", str(run_dir), log=log, env={"EAPO_SUPERVISION__MAX_RESTARTS": "0"}) as strict:
        wait_for(lambda: strict.poll() is None and last_step(run_dir) > stopped_at, 300, "a step after resuming")
        os.kill(pids(run_dir)["learner"], signal.SIGKILL)
        assert strict.wait(timeout=120) == 3, log.read_text()[-4000:]
    out = log.read_text()
    assert f"resuming {run_dir} after step {stopped_at}" in out
    assert "resuming with a changed setting: supervision.max_restarts: 5 -> 0" in out
    assert "learner exited with code -9 after 0 restarts: restart budget spent" in out
    assert out.count(f"resume with: eapo up --resume {run_dir}") == 1
    assert all(gone(pid) for pid in pids(run_dir).values())  # stopped cleanly: nothing left running

    with up("--resume", str(run_dir), log=log, env={"EAPO_SUPERVISION__MAX_RESTARTS": "5"}) as resumed:
        assert resumed.wait(timeout=600) == 0, log.read_text()[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["resumed"], summary
    print("ledger:", json.dumps(ledger_after(run_dir, steps)))
