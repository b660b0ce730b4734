"""The learner's prompt feeder: keeps the prompts stream filled from the training split.

The learner admits the prompts, not the rollout replicas, so that staleness is bounded by admission:
before step ``s`` at most ``(s + max_staleness + 1) · batch_groups`` prompts are out, plus one for every
group dropped (it never trains). Bounding it by discarding slow groups instead would bias training
against the consulting ones.
"""

from __future__ import annotations

import random

import redis.asyncio as aioredis

from eapo.core.data import Problem
from proto import Names
from proto.streams import StreamProducer


class PromptFeeder:
    """Admits the problems in one seeded order, every epoch the same, as prompt ids ``<id>@<epoch>``."""

    def __init__(
        self,
        client: aioredis.Redis,
        names: Names,
        problems: list[Problem],
        seed: int,
        batch_groups: int,
        max_staleness: int,
    ):
        self.client, self.names = client, names
        self.problems = problems
        self.order = list(range(len(problems)))
        random.Random(seed).shuffle(self.order)
        self.batch_groups, self.max_staleness = batch_groups, max_staleness
        self.admitted = 0  # restored from the run's counters on resume
        # No back-pressure: admission is the bound, and acknowledged entries are trimmed by the learner.
        self.producer = StreamProducer(client, names.prompts, [names.rollout_group], high_water=1 << 30)

    def limit(self, step: int, dropped: int) -> int:
        """How many prompts may have been admitted while the learner is at ``step``."""
        return (step + self.max_staleness + 1) * self.batch_groups + dropped

    async def fill(self, step: int, dropped: int) -> None:
        """Admit prompts up to the limit at ``step`` and record the total in the run's counters."""
        while self.admitted < self.limit(step, dropped):
            epoch, i = divmod(self.admitted, len(self.order))
            p = self.problems[self.order[i]]
            await self.producer.send(p.task(f"{p.id}@{epoch}", admitted_at_step=step))
            self.admitted += 1
        await self.client.hset(self.names.counters, "admitted", self.admitted)
