"""Two rollout replicas share one run; the first is SIGKILLed while it holds prompts. The survivor reclaims
them, every prompt is rolled out (a prompt whose group the dead replica had already pushed may be
rolled out again, and is then trained once), and the groups reach the learner. Real Redis, the real
gateway over CPU expert servers, real learner and rollout processes."""

import signal
from collections import defaultdict

import pytest
import redis
from helpers import audited

from proto import Names, TrajectoryGroup

pytestmark = pytest.mark.e2e
STEPS, BATCH = 6, 2


def held_by(client: redis.Redis, names: Names, consumer: str) -> set[str]:
    """Prompt entries delivered to ``consumer`` and not acknowledged."""
    if not client.exists(names.prompts) or not client.xinfo_groups(names.prompts):
        return set()
    pending = client.xpending_range(names.prompts, "rollout", "-", "+", 1000, consumername=consumer)
    return {e["message_id"].decode() for e in pending}


def test_a_killed_replica_loses_no_prompt_and_trains_none_twice(stack, redis_server, gateway):
    names = stack.names
    client = stack.use_redis(redis_server.url)
    stack.audit()
    stack.write(
        redis={"claim_idle_ms": 1000},
        learner={"steps": STEPS, "batch_groups": BATCH, "max_staleness": 2},
        rollout={"gateway_url": gateway, "group_size": 4, "max_groups_in_flight": 2},
    )
    learner = stack.start("learner")
    doomed = stack.start("rollout", name="rollout-a", env={"EAPO_ROLLOUT__REPLICA": "rollout-a"})
    stack.wait(  # kill rollout-a while it holds prompts
        lambda: held_by(client, names, "rollout-a"), 120, "rollout-a taking a prompt", alive=(doomed,), interval_s=0.05
    )
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    held_by_a = held_by(client, names, "rollout-a")  # what it died with (reclaimable only after 1 s idle)
    # The survivor starts after the death, so the run cannot end before it has read: its start-up (seconds)
    # outlasts the 1 s idle, and each read reclaims before it takes new prompts. Started alongside, it
    # could fill the learner's batches before the held prompts became reclaimable (seen on an idle machine).
    survivor = stack.start("rollout", name="rollout-b", env={"EAPO_ROLLOUT__REPLICA": "rollout-b"})
    stack.finish(learner, timeout_s=300)
    stack.finish(survivor, timeout_s=120)

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
    records = stack.metrics()
    trained = [gid for r in records for gid in r["group_ids"]]
    assert len(records) == STEPS and len(trained) == len(set(trained)) == STEPS * BATCH
    assert {g.rollout_replica for gid in trained for g in produced[gid.removeprefix("prompt-")]} >= {"rollout-b"}
    counters = {k.decode(): int(v) for k, v in client.hgetall(names.counters).items()}
    duplicates = sum(len(groups) - 1 for groups in produced.values())
    assert counters.get("dropped:duplicate", 0) <= duplicates
