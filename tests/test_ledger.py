"""The learner's duplicate ledger against a real Redis: duplicates refused, trained ids survive a
restart, and the ledger forgets ids past the horizon while refusing groups that old."""

from __future__ import annotations

import math

import pytest

from learner.ledger import Ledger, prompt_time_ms


async def prompt_group_id(client, prefix: str) -> str:
    """A group id as the rollout service makes it: from a prompt's real stream entry id."""
    entry_id = (await client.xadd(f"{prefix}:prompts", {"p": "1"})).decode()
    return f"prompt-{entry_id}"


@pytest.mark.asyncio
async def test_a_group_is_new_once_then_a_duplicate_also_after_a_restart(redis_client, prefix):
    ledger = Ledger(redis_client, f"{prefix}:trained", horizon_s=3600)
    await ledger.load([])
    a, b, c = [await prompt_group_id(redis_client, prefix) for _ in range(3)]
    assert [ledger.verdict(a), ledger.verdict(a), ledger.verdict(b)] == ["new", "duplicate", "new"]
    async with redis_client.pipeline(transaction=True) as pipe:
        ledger.record_trained(pipe, [a])  # b was read but dropped (say zero-signal): not trained
        await pipe.execute()

    restarted = Ledger(redis_client, f"{prefix}:trained", horizon_s=3600)
    assert await restarted.load([c]) == 2  # c: in the checkpoint, killed before Redis recorded it
    assert [restarted.verdict(a), restarted.verdict(c), restarted.verdict(b)] == ["duplicate", "duplicate", "new"]


class Clocked:
    """The Redis client with its clock (TIME) set by the test: the horizon passes without waiting for it."""

    def __init__(self, client, now_s: float):
        self.client, self.now_s = client, now_s

    def __getattr__(self, name):
        return getattr(self.client, name)

    async def time(self) -> tuple[int, int]:
        return int(self.now_s), int(self.now_s % 1 * 1e6)


@pytest.mark.asyncio
async def test_ids_past_the_horizon_are_forgotten_and_such_groups_refused(redis_client, prefix):
    key = f"{prefix}:trained"
    seconds, micros = await redis_client.time()
    clock = Clocked(redis_client, seconds + micros / 1e6)
    ledger = Ledger(clock, key, horizon_s=60)
    await ledger.tick()
    old = await prompt_group_id(redis_client, prefix)
    assert ledger.verdict(old) == "new" and ledger.verdict("hand-made-id") == "new"
    async with redis_client.pipeline(transaction=True) as pipe:
        ledger.record_trained(pipe, [old, "hand-made-id"])
        await pipe.execute()
    clock.now_s += 61  # past the horizon of the old prompt
    fresh = f"prompt-{int(clock.now_s * 1000)}-0"
    await ledger.tick()
    assert [m.decode() for m in await redis_client.zrange(key, 0, -1)] == ["hand-made-id"]
    assert set(ledger.seen) == {"hand-made-id"}
    assert ledger.verdict(old) == "expired"  # forgotten, yet still never trained twice
    assert ledger.verdict(fresh) == "new"
    assert ledger.verdict("hand-made-id") == "duplicate"  # ids of another form never expire


def test_prompt_time_comes_from_the_entry_id():
    assert prompt_time_ms("prompt-1795443903442-7") == 1795443903442.0
    assert prompt_time_ms("prompt-x-1") == math.inf and prompt_time_ms("g1") == math.inf
