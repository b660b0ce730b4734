"""Which trajectory groups the learner has already seen, so none is trained on twice — in bounded memory.

A group comes back after a learner restart (trained, not yet acknowledged) or when a second rollout
replica re-rolls a prompt whose first replica died after pushing the group. Both name the same
group id, ``prompt-<prompt entry id>``, and a prompt's entry id starts with the Redis time (ms) at
which the learner admitted it. That time bounds the ledger: a group whose prompt is older than
``horizon_s`` is refused as *expired* (counted), so its id need not be remembered past the horizon —
nothing can be trained twice, and the ledger holds only the horizon's worth of ids. With admission
control a group normally arrives seconds to minutes after its prompt; the horizon (hours) only
catches a replica that stalled that long.
"""

from __future__ import annotations

import math
from typing import Literal

import redis.asyncio as aioredis

Verdict = Literal["new", "duplicate", "expired"]


def prompt_time_ms(group_id: str) -> float:
    """Admission time of the group's prompt; ``inf`` (never expires) for ids of another form."""
    try:
        prefix, ms, _seq = group_id.split("-")
        return float(int(ms)) if prefix == "prompt" else math.inf
    except ValueError:
        return math.inf


class Ledger:
    """In memory: every group id read within the horizon. In Redis (a sorted set scored by prompt
    time): the ids trained on, written in the same transaction as their acknowledgement."""

    def __init__(self, client: aioredis.Redis, key: str, horizon_s: float):
        self.client, self.key, self.horizon_ms = client, key, horizon_s * 1000.0
        self.seen: dict[str, float] = {}
        self.now_ms = 0.0

    async def load(self, trained_now: list[str]) -> int:
        """Resume: the trained ids in Redis, plus those a checkpoint recorded but Redis may lack."""
        if trained_now:
            await self.client.zadd(self.key, {g: prompt_time_ms(g) for g in trained_now})
        await self.tick()
        self.seen = {m.decode(): score for m, score in await self.client.zrange(self.key, 0, -1, withscores=True)}
        return len(self.seen)

    async def tick(self) -> None:
        """Read the Redis clock (the clock prompt ids are stamped with) and forget expired ids."""
        seconds, micros = await self.client.time()
        self.now_ms = seconds * 1000.0 + micros / 1000.0
        cutoff = self.now_ms - self.horizon_ms
        self.seen = {g: t for g, t in self.seen.items() if t >= cutoff}
        await self.client.zremrangebyscore(self.key, "-inf", f"({cutoff}")

    def verdict(self, group_id: str) -> Verdict:
        """Judge a group as it is read; a ``new`` one is remembered from now on."""
        t = prompt_time_ms(group_id)
        if t < self.now_ms - self.horizon_ms:
            return "expired"
        if group_id in self.seen:
            return "duplicate"
        self.seen[group_id] = t
        return "new"

    def record_trained(self, pipe: aioredis.client.Pipeline, group_ids: list[str]) -> None:
        """Queue the trained ids on ``pipe``, the transaction that acknowledges them."""
        if group_ids:
            pipe.zadd(self.key, {g: prompt_time_ms(g) for g in group_ids})
