"""The Redis Streams transport against a real Redis server."""

import asyncio
import time

import pytest

from proto import PromptTask, decode
from proto.streams import StreamConsumer, StreamProducer, trim_acknowledged

pytestmark = pytest.mark.asyncio


def task(i: int) -> PromptTask:
    return PromptTask(prompt_id=f"p{i}", problem=f"{i}+1", answer=str(i + 1))


def consumer(client, stream, name, **kw) -> StreamConsumer[PromptTask]:
    return StreamConsumer(client, stream, "g", name, PromptTask, counters_key=f"{stream}:counters", **kw)


async def filled(client, prefix: str, tasks: int, name: str, **kw) -> tuple[str, StreamConsumer]:
    """A stream holding prompts p0..p{tasks-1}, and consumer ``name`` of group g on it."""
    stream = f"{prefix}:s"
    c = consumer(client, stream, name, **kw)
    await c.ensure_group()
    producer = StreamProducer(client, stream, ["g"], high_water=100)
    for i in range(tasks):
        await producer.send(task(i))
    return stream, c


async def test_delivers_each_entry_once_and_acks(redis_client, prefix):
    stream, c = await filled(redis_client, prefix, 5, "c1")
    got = await c.read(count=10, block_ms=100)
    assert [e.message.prompt_id for e in got] == [f"p{i}" for i in range(5)]
    assert await c.read(count=10, block_ms=50) == []
    assert await c.ack([e.id for e in got]) == 5
    assert (await redis_client.xpending(stream, "g"))["pending"] == 0


async def reclaimed_by(c: StreamConsumer, count: int, timeout_s: float = 30.0) -> list:
    """Read until ``count`` entries arrive: reclaiming waits for the idle timeout, however slow the machine."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} entries reclaimed"
        got += await c.read(count=count - len(got), block_ms=50)
    return got


async def test_crash_before_ack_is_reclaimed_by_another_consumer(redis_client, prefix):
    stream, dead = await filled(redis_client, prefix, 3, "dead", claim_idle_ms=1000)
    t0 = time.monotonic()
    taken = await dead.read(count=3, block_ms=100)
    assert len(taken) == 3  # ... and the consumer dies here, without acking
    survivor = consumer(redis_client, stream, "survivor", claim_idle_ms=1000)
    reclaimed = await reclaimed_by(survivor, 3)
    assert time.monotonic() - t0 >= 0.95  # not before they were idle long enough (Redis's ms clock: 5% slack)
    assert sorted(e.message.prompt_id for e in reclaimed) == ["p0", "p1", "p2"]
    await survivor.ack([e.id for e in reclaimed])
    pending = await redis_client.xpending(stream, "g")
    assert pending["pending"] == 0  # nothing lost, nothing left behind


async def test_a_consumer_never_reclaims_what_it_holds_itself(redis_client, prefix):
    """Seen on a busy machine: the learner's batch took longer to fill than the idle timeout, it
    reclaimed its own entries, judged them duplicates of themselves and acknowledged them before the
    step that trained them was durable."""
    stream, c = await filled(redis_client, prefix, 2, "learner-0", claim_idle_ms=20)
    held = await c.read(count=1, block_ms=50)
    await asyncio.sleep(0.1)  # held far past the idle timeout (a lower bound: a slow machine waits longer)
    again = await c.read(count=5, block_ms=50)
    assert [e.message.prompt_id for e in held + again] == ["p0", "p1"]  # p0 is not delivered twice
    assert (await redis_client.xpending(stream, "g"))["pending"] == 2
    other = consumer(redis_client, stream, "learner-1", claim_idle_ms=20)
    stolen = await reclaimed_by(other, 2)  # another consumer does take them once they are idle
    assert sorted(e.message.prompt_id for e in stolen) == ["p0", "p1"]


async def test_an_entry_trimmed_while_pending_is_acknowledged_not_returned(redis_client, prefix):
    stream, dead = await filled(redis_client, prefix, 2, "dead", claim_idle_ms=20)
    taken = await dead.read(count=2, block_ms=50)
    await redis_client.xdel(stream, taken[0].id)
    survivor = consumer(redis_client, stream, "survivor", claim_idle_ms=20)
    got = await reclaimed_by(survivor, 1)
    assert [e.message.prompt_id for e in got] == ["p1"]
    rows = await redis_client.xpending_range(stream, "g", "-", "+", 10)
    assert [r["message_id"].decode() for r in rows] == [taken[1].id]  # the deleted one left the PEL


async def test_undecodable_entry_goes_to_dead_letter_and_is_counted(redis_client, prefix):
    stream = f"{prefix}:s"
    c = consumer(redis_client, stream, "c1")
    await c.ensure_group()
    producer = StreamProducer(redis_client, stream, ["g"], high_water=100)
    await producer.send(task(0))
    bad_id = (await redis_client.xadd(stream, {b"d": b"garbage that is not a frame"})).decode()
    await redis_client.xadd(stream, {b"other": b"no payload field"})
    await producer.send(task(1))
    got = await c.read(count=10, block_ms=100)
    assert [e.message.prompt_id for e in got] == ["p0", "p1"]
    dead = await redis_client.xrange(f"{stream}:dead")
    assert len(dead) == 2
    fields = dead[0][1]
    assert fields[b"source_id"].decode() == bad_id
    assert b"shorter than the frame header" in fields[b"error"] or b"bad magic" in fields[b"error"]
    assert fields[b"d"] == b"garbage that is not a frame"  # the payload is kept for inspection
    assert int(await redis_client.hget(f"{stream}:counters", "dead_letter:undecodable")) == 2
    await c.ack([e.id for e in got])
    assert (await redis_client.xpending(stream, "g"))["pending"] == 0


async def test_entry_that_keeps_failing_is_dead_lettered_as_poison(redis_client, prefix):
    stream = f"{prefix}:s"
    producer = StreamProducer(redis_client, stream, ["g"], high_water=100)
    await consumer(redis_client, stream, "c0").ensure_group()
    await producer.send(task(0))
    for i in range(2):  # delivered to a consumer that crashes on it, each time a fresh one
        got = await reclaimed_by(consumer(redis_client, stream, f"c{i}", claim_idle_ms=10, max_deliveries=2), 1)
        assert got[0].message.prompt_id == "p0"
        await asyncio.sleep(0.02)  # idle past the timeout (a lower bound)
    assert await consumer(redis_client, stream, "c2", claim_idle_ms=10, max_deliveries=2).read(1, 50) == []
    dead = await redis_client.xrange(f"{stream}:dead")
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"poison"
    assert decode(dead[0][1][b"d"], PromptTask).prompt_id == "p0"


async def test_backpressure_waits_instead_of_trimming_unread(redis_client, prefix):
    stream = f"{prefix}:s"
    c = consumer(redis_client, stream, "c1")
    await c.ensure_group()
    producer = StreamProducer(redis_client, stream, ["g"], high_water=3, poll_s=0.01)
    for i in range(3):
        await producer.send(task(i))
    assert await producer.backlog() == 3
    with pytest.raises(TimeoutError):
        await producer.send(task(3), timeout_s=0.1)
    assert await redis_client.xlen(stream) == 3  # nothing trimmed, nothing added

    blocked = asyncio.create_task(producer.send(task(3)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    got = await c.read(count=1, block_ms=50)
    assert await producer.backlog() == 3  # delivered but unacked still counts
    await c.ack([got[0].id])
    await asyncio.wait_for(blocked, timeout=2)
    rest = await c.read(count=10, block_ms=50)
    assert [e.message.prompt_id for e in rest] == ["p1", "p2", "p3"]


async def test_trim_removes_only_what_every_group_acknowledged(redis_client, prefix):
    stream = f"{prefix}:s"
    fast = StreamConsumer(redis_client, stream, "fast", "c", PromptTask)
    slow = StreamConsumer(redis_client, stream, "slow", "c", PromptTask)
    await fast.ensure_group()
    await slow.ensure_group()
    producer = StreamProducer(redis_client, stream, ["fast", "slow"], high_water=100)
    for i in range(6):
        await producer.send(task(i))
    got_fast = await fast.read(count=6, block_ms=50)
    await fast.ack([e.id for e in got_fast])
    got_slow = await slow.read(count=4, block_ms=50)
    await slow.ack([e.id for e in got_slow[:2]])  # slow: 2 acked, 2 pending, 2 unread
    assert await trim_acknowledged(redis_client, stream) == 2
    assert await redis_client.xlen(stream) == 4
    remaining = await slow.read(count=10, block_ms=50)
    assert [e.message.prompt_id for e in remaining] == ["p4", "p5"]
    await slow.ack([e.id for e in got_slow[2:]] + [e.id for e in remaining])
    assert await trim_acknowledged(redis_client, stream) == 4
    assert await redis_client.xlen(stream) == 0


async def test_trim_survives_everything_being_acknowledged_between_its_two_reads(redis_client, prefix):
    """Seen in a real run: XINFO GROUPS reported pending entries, the consumer acknowledged them, and
    XPENDING then had no minimum. Trimming must fall back to the last delivered id, not crash."""
    stream, c = await filled(redis_client, prefix, 4, "c1")
    got = await c.read(count=3, block_ms=50)
    stale = await redis_client.xinfo_groups(stream)  # 3 pending, as the trimmer first sees it
    await c.ack([e.id for e in got])

    class StaleInfo:
        def __getattr__(self, name):
            return getattr(redis_client, name)

        async def xinfo_groups(self, name):
            return stale

    assert await trim_acknowledged(StaleInfo(), stream) == 3
    assert [e.message.prompt_id for e in await c.read(count=10, block_ms=50)] == ["p3"]


async def test_restart_under_the_same_name_rereads_its_own_pending_first(redis_client, prefix):
    stream, before = await filled(redis_client, prefix, 5, "learner-0")
    taken = await before.read(count=3, block_ms=50)
    await before.ack([taken[0].id])  # p0 done; p1, p2 delivered but unacked when the process dies
    after = consumer(redis_client, stream, "learner-0")  # restarted: long idle timeout, same name
    first = await after.read(count=1, block_ms=50)
    second = await after.read(count=1, block_ms=50)
    rest = await after.read(count=10, block_ms=50)
    assert [e.message.prompt_id for e in first + second] == ["p1", "p2"]  # each once, in order
    assert [e.message.prompt_id for e in rest] == ["p3", "p4"]
