"""Two rollout replicas share one run; one is SIGKILLed while it holds prompts. The survivor reclaims
them, every prompt is rolled out (a prompt whose group the dead replica had already pushed may be
rolled out again, and is then trained once), and the groups reach the learner. Real Redis, the real
gateway over CPU expert servers, real learner and rollout processes."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import redis
import yaml
from helpers import audited, start_audit

from proto import Names, TrajectoryGroup

pytestmark = pytest.mark.e2e
STEPS, BATCH = 6, 2


def start(role: str, config, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "eapo.cli", role, "--config", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def held_by(client: redis.Redis, names: Names, consumer: str) -> set[str]:
    """Prompt entries delivered to ``consumer`` and not acknowledged."""
    if not client.exists(names.prompts) or not client.xinfo_groups(names.prompts):
        return set()
    pending = client.xpending_range(names.prompts, "rollout", "-", "+", 1000, consumername=consumer)
    return {e["message_id"].decode() for e in pending}


def test_a_killed_replica_loses_no_prompt_and_trains_none_twice(tiny_world, redis_server, gateway, tmp_path, prefix):
    names = Names(prefix)
    client = redis.Redis.from_url(redis_server.url)
    start_audit(client, names)
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "world": tiny_world.model_dump(mode="json"),
                "redis": {"prefix": prefix, "claim_idle_ms": 1000},
                # the barely trained test world never solves a problem: keep its zero-signal groups
                "learner": {"steps": STEPS, "batch_groups": BATCH, "max_staleness": 2, "dynamic_sampling": False},
                "rollout": {"gateway_url": gateway, "group_size": 4, "max_groups_in_flight": 2, "max_new_tokens": 32},
                "anneal": {"penalty": {"kind": "constant", "start": 0.1, "end": 0.1}},
            }
        )
    )
    env = {"REDIS_URL": redis_server.url, "OMP_NUM_THREADS": "1"}
    learner = start("learner", config, env)
    doomed = start("rollout", config, env | {"EAPO_ROLLOUT__REPLICA": "rollout-a"})
    survivor = start("rollout", config, env | {"EAPO_ROLLOUT__REPLICA": "rollout-b"})
    try:
        deadline = time.monotonic() + 120
        while not held_by(client, names, "rollout-a"):  # kill rollout-a while it holds prompts
            assert doomed.poll() is None, doomed.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "rollout-a never took a prompt"
            time.sleep(0.05)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        held_by_a = held_by(client, names, "rollout-a")  # what it died with (reclaimable only after 1 s idle)

        out, _ = learner.communicate(timeout=300)
        assert learner.returncode == 0, out[-3000:]
        out, _ = survivor.communicate(timeout=120)
        assert survivor.returncode == 0, out[-3000:]
    finally:
        for p in (learner, doomed, survivor):
            if p.poll() is None:
                p.kill()

    produced: dict[str, list[TrajectoryGroup]] = defaultdict(list)
    for group in audited(client, names):
        produced[group.group_id.removeprefix("prompt-")].append(group)
    # The prompts rollout-a held when it died were reclaimed and rolled out by rollout-b.
    assert held_by_a and held_by_a <= set(produced)
    for prompt_entry in held_by_a:
        assert "rollout-b" in {g.rollout_replica for g in produced[prompt_entry]}
    # Exactly once, except a prompt rollout-a had pushed but not acknowledged: then once by each.
    for prompt_entry, groups in produced.items():
        assert len(groups) == 1 or (
            prompt_entry in held_by_a and sorted(g.rollout_replica for g in groups) == ["rollout-a", "rollout-b"]
        ), (prompt_entry, [g.rollout_replica for g in groups])
    # No prompt is left behind: nothing pending in the prompts group, rollout-a's entries included.
    assert client.xpending(names.prompts, "rollout")["pending"] == 0
    # The groups reached the learner; none was trained twice; every produced group is accounted for.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [gid for r in records for gid in r["group_ids"]]
    assert len(records) == STEPS and len(trained) == len(set(trained)) == STEPS * BATCH
    assert {g.rollout_replica for gid in trained for g in produced[gid.removeprefix("prompt-")]} >= {"rollout-b"}
    counters = {k.decode(): int(v) for k, v in client.hgetall(names.counters).items()}
    duplicates = sum(len(groups) - 1 for groups in produced.values())
    assert counters.get("dropped:duplicate", 0) <= duplicates
    client.close()
