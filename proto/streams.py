"""Redis Streams transport: a backpressured producer and an at-least-once consumer-group reader.

Contracts (DESIGN §4): an entry is acknowledged only by the consumer, after its work is durable;
entries a dead consumer left pending are reclaimed (XAUTOCLAIM) after an idle timeout; undecodable
or repeatedly failing entries go to a dead-letter stream, counted; producers wait when the backlog
passes a high-water mark, and trimming removes only entries every group has acknowledged.
Works on Redis ≥ 6.2 (XINFO GROUPS ``lag`` is used when the server has it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from proto import Message, ProtoError, decode, encode

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
FIELD = b"d"

DEAD_LETTERED = Counter(
    "eapo_stream_dead_lettered_total", "Entries moved to a dead-letter stream", ["stream", "reason"]
)
RECLAIMED = Counter("eapo_stream_reclaimed_total", "Pending entries reclaimed from idle consumers", ["stream"])
BACKPRESSURE_WAITS = Counter("eapo_stream_backpressure_waits_total", "Sends that waited on backlog", ["stream"])
BACKLOG = Gauge("eapo_stream_backlog", "Unacknowledged entries (pending + undelivered)", ["stream"])


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; it then reads from the beginning."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except aioredis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class Entry(Generic[M]):
    id: str
    message: M


async def trim_acknowledged(client: aioredis.Redis, stream: str) -> int:
    """Remove entries that every consumer group has acknowledged; returns how many were removed.
    Long runs call this after each step so that the streams stay bounded in Redis memory."""
    try:
        infos = await client.xinfo_groups(stream)
    except aioredis.ResponseError:
        return 0
    if not infos:
        return 0
    boundaries = []
    for info in infos:
        boundary = _next_id(_s(info["last-delivered-id"]))
        if int(info["pending"]):
            # A consumer may acknowledge everything between the two calls: then nothing is pending,
            # and the (older, so smaller) last-delivered id above is still a safe boundary.
            first = (await client.xpending(stream, _s(info["name"])))["min"]
            if first is not None:
                boundary = _s(first)
        boundaries.append(boundary)
    minid = min(boundaries, key=lambda i: tuple(int(p) for p in i.split("-")))
    return int(await client.xtrim(stream, minid=minid, approximate=False))


class StreamProducer:
    """XADD with backpressure: waits while any consumer group's backlog is at ``high_water``.

    The backlog is read from Redis only when this producer's credit runs out (credit = high_water −
    backlog at the last reading; consumers can only shrink the backlog meanwhile), so a steady stream
    costs one extra round trip per ``credit`` sends, not per send. With P producers on one stream the
    backlog stays below P·high_water.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        stream: str,
        groups: list[str],
        high_water: int,
        poll_s: float = 0.05,
    ):
        self.client, self.stream, self.groups = client, stream, groups
        self.high_water, self.poll_s = high_water, poll_s
        self._credit = 0

    async def backlog(self) -> int:
        """Largest (pending + undelivered) over the watched groups; 0 when none exists yet."""
        try:
            infos = await self.client.xinfo_groups(self.stream)
        except aioredis.ResponseError:  # no such stream yet
            return 0
        worst = 0
        for info in infos:
            if _s(info["name"]) not in self.groups:
                continue
            lag = info.get("lag")
            if lag is None:  # Redis 6.2, or 7 after a deletion made lag unknowable
                lag = await self._undelivered(_s(info["last-delivered-id"]))
            worst = max(worst, int(info["pending"]) + int(lag))
        BACKLOG.labels(self.stream).set(worst)
        return worst

    async def _undelivered(self, last_delivered: str) -> int:
        # Counting is bounded: only whether we are past the high-water mark matters.
        start = "-" if last_delivered == "0-0" else "(" + last_delivered
        entries = await self.client.xrange(self.stream, min=start, max="+", count=self.high_water + 1)
        return len(entries)

    async def send(self, message: Message, timeout_s: float | None = None) -> str:
        """Encode and XADD; wait (never trim unread data) while the backlog is at the high-water mark."""
        payload = encode(message)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited = False
        while self._credit <= 0 and (credit := self.high_water - await self.backlog()) <= 0:
            if not waited:
                BACKPRESSURE_WAITS.labels(self.stream).inc()
                log.info("backpressure on %s: backlog at high-water mark %d", self.stream, self.high_water)
                waited = True
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.stream}: backlog stayed at {self.high_water} for {timeout_s}s")
            await asyncio.sleep(self.poll_s)
        if self._credit <= 0:
            self._credit = credit
        self._credit -= 1
        return _s(await self.client.xadd(self.stream, {FIELD: payload}))


class StreamConsumer(Generic[M]):
    """XREADGROUP reader for one consumer of a group; the caller acks after its work is durable."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        message_type: type[M],
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        counters_key: str | None = None,
    ):
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.message_type = message_type
        self.claim_idle_ms, self.max_deliveries = claim_idle_ms, max_deliveries
        self.dead_letter_stream = f"{stream}:dead"
        self.counters_key = counters_key
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._own_pending_cursor: str | None = "0"  # None once this consumer's old backlog is read

    async def ensure_group(self) -> None:
        await ensure_group(self.client, self.stream, self.group)

    async def read(self, count: int = 16, block_ms: int = 1000) -> list[Entry[M]]:
        """Own pending entries (after a restart under the same name), reclaimed ones, then new ones.
        Bad entries are dead-lettered, never returned."""
        raw = await self._own_pending(count)
        if not raw:
            raw = await self._reclaim(count)
        if len(raw) < count:
            reply = await self.client.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=count - len(raw),
                block=None if raw else block_ms,
            )
            for _stream, entries in reply or []:
                raw.extend((_s(i), f) for i, f in entries)
        out: list[Entry[M]] = []
        for entry_id, fields in raw:
            try:
                if not fields or FIELD not in fields:
                    raise ProtoError(f"entry has no {FIELD.decode()!r} field")
                out.append(Entry(entry_id, decode(fields[FIELD], self.message_type)))
            except ProtoError as exc:
                await self.dead_letter(entry_id, fields, str(exc), reason="undecodable")
        return out

    async def _own_pending(self, count: int) -> list[tuple[str, dict]]:
        """Entries delivered to this consumer name before a restart and never acknowledged."""
        if self._own_pending_cursor is None:
            return []
        reply = await self.client.xreadgroup(
            self.group, self.consumer, {self.stream: self._own_pending_cursor}, count=count
        )
        entries = [(_s(i), f) for _stream, batch in reply or [] for i, f in batch]
        self._own_pending_cursor = entries[-1][0] if entries else None
        return entries

    async def _reclaim(self, count: int) -> list[tuple[str, dict]]:
        """Entries other consumers left idle past ``claim_idle_ms``, claimed for this one.

        Never this consumer's own: an entry it holds is work in progress (a learner filling its
        batch, a replica rolling a prompt out), and taking it back would deliver it twice to the same
        process — counted as a duplicate and acknowledged before its work was durable. Its own entries
        from before a restart come back once, through ``_own_pending``. (XAUTOCLAIM cannot exclude a
        consumer, so this lists idle entries with XPENDING and claims the others' with XCLAIM, which
        re-checks the idle time atomically and counts the delivery.)"""
        # Nothing can become claimable faster than the idle timeout: look a few times per timeout,
        # not on every read (a round trip saved on the hot path). A scan in progress continues.
        now = time.monotonic()
        if now < self._next_claim and self._claim_cursor == "0-0":
            return []
        self._next_claim = now + self.claim_idle_ms / 4000
        start = "-" if self._claim_cursor == "0-0" else "(" + self._claim_cursor
        rows = await self.client.xpending_range(
            self.stream, self.group, min=start, max="+", count=count * 4, idle=self.claim_idle_ms
        )
        self._claim_cursor = _s(rows[-1]["message_id"]) if len(rows) == count * 4 else "0-0"
        ids = [_s(r["message_id"]) for r in rows if _s(r["consumer"]) != self.consumer][:count]
        if not ids:
            return []
        reply = await self.client.xclaim(self.stream, self.group, self.consumer, self.claim_idle_ms, ids)
        claimed = [(_s(i), f) for i, f in reply if i is not None and f is not None]
        got = {i for i, _ in claimed}
        gone = [i for i in ids if i not in got]
        if gone:  # trimmed while pending (Redis 6.2 answers nil, 7 drops them), or acked meanwhile
            async with self.client.pipeline(transaction=False) as pipe:
                for entry_id in gone:
                    pipe.xrange(self.stream, min=entry_id, max=entry_id)
                present = await pipe.execute()
            trimmed = [i for i, found in zip(gone, present, strict=True) if not found]
            if trimmed:
                await self.client.xack(self.stream, self.group, *trimmed)
        if not claimed:
            return []
        RECLAIMED.labels(self.stream).inc(len(claimed))
        log.warning("%s: reclaimed %d entries left pending by idle consumers", self.stream, len(claimed))
        deliveries = await self._delivery_counts([i for i, _ in claimed])
        keep = []
        for entry_id, fields in claimed:
            if deliveries.get(entry_id, 0) > self.max_deliveries:
                await self.dead_letter(
                    entry_id, fields, f"delivered {deliveries[entry_id]} times without ack", reason="poison"
                )
            else:
                keep.append((entry_id, fields))
        return keep

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        rows = await self.client.xpending_range(
            self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) * 4, consumername=self.consumer
        )
        return {_s(r["message_id"]): int(r["times_delivered"]) for r in rows}

    async def dead_letter(self, entry_id: str, fields: dict | None, error: str, reason: str) -> None:
        """Move an entry aside with the reason, then ack it: it is counted, not lost, not retried."""
        log.error("%s: dead-lettering entry %s (%s): %s", self.stream, entry_id, reason, error)
        record = {b"source_id": entry_id, b"reason": reason, b"error": error[:2000]}
        if fields and FIELD in fields:
            record[FIELD] = fields[FIELD]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter_stream, record)
            pipe.xack(self.stream, self.group, entry_id)
            if self.counters_key:
                pipe.hincrby(self.counters_key, f"dead_letter:{reason}", 1)
            await pipe.execute()
        DEAD_LETTERED.labels(self.stream, reason).inc()

    async def ack(self, ids: list[str]) -> int:
        return int(await self.client.xack(self.stream, self.group, *ids)) if ids else 0
