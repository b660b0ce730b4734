"""``eapo rollout``: read prompts from the prompts stream, roll out groups, push them to the learner.

Any number of replicas share a run: each reads its share of the prompts stream through the
``rollout`` consumer group; a dead replica's unacknowledged prompts are reclaimed by the others. A
prompt is acknowledged only after its group is on the trajectory stream. The replica loads each
newly published weight version before starting new groups, and stops when the learner says done
(or on SIGTERM), finishing the groups it holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import redis.asyncio as aioredis

from eapo.core.config import EAPOConfig
from eapo.core.metrics import serve_metrics
from eapo.core.timeline import Timeline
from proto import AnnealState, Names, PromptTask, TrajectoryGroup, WeightManifest, decode
from proto.streams import Entry, StreamConsumer, StreamProducer
from proto.weights import version_dir
from rollout_service.engine import PolicyEngine, open_engine
from rollout_service.episode import run_episode
from rollout_service.expert_client import ExpertClient, gateway_session
from rollout_service.metrics import GROUPS, POLICY_VERSION

log = logging.getLogger(__name__)


async def wait_for_key(client: aioredis.Redis, key: str, stop: asyncio.Event, poll_s: float = 0.2) -> bytes | None:
    while not stop.is_set():
        value = await client.get(key)
        if value is not None:
            return value
        await asyncio.sleep(poll_s)
    return None


class RolloutService:
    def __init__(self, cfg: EAPOConfig, client: aioredis.Redis):
        self.cfg, self.client, self.names = cfg, client, Names(cfg.redis.prefix)
        self.stop = asyncio.Event()
        self.engine: PolicyEngine | None = None
        self.groups_done = 0
        self.timeline = Timeline(cfg.run_dir if cfg.timeline else None, cfg.rollout.replica)

    async def _latest_weights(self) -> WeightManifest | None:
        raw = await self.client.get(self.names.weights)
        return decode(raw, WeightManifest) if raw else None

    async def _report_version(self, version: int) -> None:
        """Tell the learner's garbage collector which version this replica reads."""
        report = json.dumps({"version": version, "at": time.time()})
        await self.client.hset(self.names.rollout_versions, self.cfg.rollout.replica, report)

    async def _sync_weights(self) -> None:
        latest = await self._latest_weights()
        if latest is not None and self.engine is not None and latest.version > self.engine.version:
            await self._report_version(latest.version)
            # the span ends when the engine serves the version: its next batch samples with it
            with self.timeline.span("load_weights", version=latest.version):
                await self.engine.load_version(latest.version, version_dir(self.cfg.weights_dir, latest.version))
            POLICY_VERSION.set(latest.version)

    async def _anneal(self) -> AnnealState:
        return decode(await self.client.get(self.names.anneal), AnnealState)

    async def _roll_group(
        self, entry: Entry[PromptTask], experts: ExpertClient | None, consumer: StreamConsumer, producer: StreamProducer
    ) -> None:
        assert self.engine is not None
        anneal = await self._anneal()
        with self.timeline.span("group", prompt=entry.message.prompt_id):
            samples = await asyncio.gather(
                *(
                    run_episode(self.engine, experts, entry.message, anneal, self.cfg.rollout, i)
                    for i in range(self.cfg.rollout.group_size)
                )
            )
        group = TrajectoryGroup(
            # The prompt's entry id: a prompt reclaimed from a replica that died after pushing its group
            # but before acknowledging the prompt yields the same group id, which the learner drops.
            group_id=f"prompt-{entry.id}",
            prompt=entry.message,
            anneal=anneal,
            samples=list(samples),
            rollout_replica=self.cfg.rollout.replica,
            created_at=time.time(),
        )
        await producer.send(group)
        await consumer.ack([entry.id])
        self.groups_done += 1
        GROUPS.inc()

    async def run(self) -> None:
        rc = self.cfg.rollout
        serve_metrics(rc.metrics_port, self.cfg.metrics_host)
        log.info("rollout %s waiting for the learner's first weights and annealing state", rc.replica)
        if await wait_for_key(self.client, self.names.weights, self.stop) is None:
            return
        if await wait_for_key(self.client, self.names.anneal, self.stop) is None:
            return
        latest = await self._latest_weights()
        assert latest is not None
        await self._report_version(latest.version)
        self.engine = await open_engine(self.cfg, version_dir(self.cfg.weights_dir, latest.version), latest.version)
        consumer = StreamConsumer(
            self.client,
            self.names.prompts,
            self.names.rollout_group,
            rc.replica,
            PromptTask,
            claim_idle_ms=self.cfg.redis.claim_idle_ms,
            max_deliveries=self.cfg.redis.max_deliveries,
            counters_key=self.names.counters,
        )
        await consumer.ensure_group()
        producer = StreamProducer(
            self.client, self.names.trajectories, [self.names.learner_group], self.cfg.redis.high_water
        )
        slots = asyncio.Semaphore(rc.max_groups_in_flight)
        tasks: set[asyncio.Task] = set()
        async with gateway_session(self.cfg) as session:
            experts = ExpertClient.for_rollout(session, self.cfg) if rc.consult else None
            log.info("rollout %s serving with policy version %d", rc.replica, self.engine.version)
            while not self.stop.is_set():
                if await self.client.exists(self.names.done):
                    log.info("learner is done; draining")
                    break
                await self._sync_weights()
                await slots.acquire()
                entries = await consumer.read(count=1, block_ms=500)
                if not entries:
                    slots.release()
                    continue
                task = asyncio.create_task(self._roll_group(entries[0], experts, consumer, producer))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), slots.release(), _report(t)))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        await self.engine.close()
        self.timeline.close()
        log.info("rollout %s stopped after %d groups", rc.replica, self.groups_done)


def _report(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("group failed; its prompt stays pending for reclaim", exc_info=task.exception())


async def serve(cfg: EAPOConfig, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    service = RolloutService(cfg, client)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop.set)
    try:
        await service.run()
    finally:
        await client.aclose()
