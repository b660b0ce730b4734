"""The learner's prompt feeder: keeps the prompts stream filled from the training split.

The learner admits the prompts, not the rollout replicas, so that staleness is bounded by admission:
before step ``s`` at most ``(s + max_staleness + 1) · batch_groups`` prompts are out, plus one for every
group dropped (it never trains). Bounding it by discarding slow groups instead would bias training
against the consulting ones.

With ``learner.prompt_skip_explore`` set, the feeder also skips problems predicted to give a group with no
outcome signal before anyone samples them (GRESO, Zheng et al. 2025, arXiv:2506.02177): a problem whose
last ``z`` groups were all right or all wrong is admitted only with probability ``max(explore^z, 0.01)``.
Dynamic sampling would drop such a group after paying for its rollout; skipping it first saves that
rollout, and the floor keeps every problem in play, since a policy that changes can change its outcomes.
"""

from __future__ import annotations

import random

import redis.asyncio as aioredis

from eapo.core.data import Problem
from learner.loss import has_signal
from proto import Names, TrajectoryGroup
from proto.streams import StreamProducer

MIN_ADMIT = 0.01  # GRESO's floor on a problem's chance to be admitted, however long its streak


class PromptFeeder:
    """Walks the problems in one seeded order, every epoch the same, and admits them as prompt ids
    ``<id>@<epoch>`` (minus the skipped ones)."""

    def __init__(
        self,
        client: aioredis.Redis,
        names: Names,
        problems: list[Problem],
        seed: int,
        batch_groups: int,
        max_staleness: int,
        skip_explore: float | None = None,
        *,
        check_work: bool = False,
    ):
        self.client, self.names = client, names
        self.problems, self.seed = problems, seed
        self.order = list(range(len(problems)))
        random.Random(seed).shuffle(self.order)
        self.batch_groups, self.max_staleness = batch_groups, max_staleness
        self.skip_explore, self.check_work = skip_explore, check_work  # signal as the learner rewards it
        # restored from the run's counters and streaks on resume (``restore``)
        self.position = 0  # problems walked in the order, skipped ones included
        self.admitted = 0
        self.skipped = 0
        self.streaks: dict[str, int] = {}
        # No back-pressure: admission is the bound, and acknowledged entries are trimmed by the learner.
        self.producer = StreamProducer(client, names.prompts, [names.rollout_group], high_water=1 << 30)

    async def restore(self, counters: dict[str, int]) -> None:
        """Resume the walk where the run's counters say it was, with the streaks recorded so far."""
        self.admitted = counters.get("admitted", 0)
        self.position = counters.get("position", self.admitted)
        self.skipped = counters.get("skipped", 0)
        raw = await self.client.hgetall(self.names.prompt_streaks)
        self.streaks = {k.decode(): int(v) for k, v in raw.items()}

    def limit(self, step: int, dropped: int) -> int:
        """How many prompts may have been admitted while the learner is at ``step``."""
        return (step + self.max_staleness + 1) * self.batch_groups + dropped

    def skips(self, problem_id: str, epoch: int) -> bool:
        """Whether the walk skips ``problem_id`` in ``epoch``: a draw seeded by both against the problem's
        streak, so a resumed learner decides as the one before it would have (the streaks themselves depend
        on which groups arrived first, so two runs of one seed need not skip alike)."""
        streak = self.streaks.get(problem_id, 0)
        if self.skip_explore is None or streak == 0:
            return False
        admit = max(self.skip_explore**streak, MIN_ADMIT)
        return random.Random(f"{self.seed}:{problem_id}:{epoch}").random() >= admit

    def observe(self, group: TrajectoryGroup) -> dict[str, int]:
        """Record whether a group of a problem carried outcome signal: its streak grows or restarts. Returns
        what the learner saves (``<prefix>:prompt:streaks``) in the transaction that acknowledges the group,
        so a group read again after a crash counts once; empty when skipping is off."""
        if self.skip_explore is None:
            return {}
        problem_id = group.prompt.prompt_id.rpartition("@")[0] or group.prompt.prompt_id
        streak = 0 if has_signal(group, check_work=self.check_work) else self.streaks.get(problem_id, 0) + 1
        self.streaks[problem_id] = streak
        return {problem_id: streak}

    async def fill(self, step: int, dropped: int) -> None:
        """Admit prompts up to the limit at ``step`` and record the walk in the run's counters."""
        while self.admitted < self.limit(step, dropped):
            epoch, i = divmod(self.position, len(self.order))
            p = self.problems[self.order[i]]
            self.position += 1
            if self.skips(p.id, epoch):
                self.skipped += 1
                continue
            await self.producer.send(p.task(f"{p.id}@{epoch}", admitted_at_step=step))
            self.admitted += 1
        counts = {"admitted": self.admitted, "position": self.position, "skipped": self.skipped}
        await self.client.hset(self.names.counters, mapping=counts)
