"""``eapo learner``: consume trajectory groups, update the policy, publish weights and AnnealState.

Per step: read groups (XREADGROUP; entries a dead learner left pending are reclaimed), drop duplicate
deliveries (``learner/ledger.py``), groups past the ledger's horizon and zero-signal groups (counted,
acknowledged), take ``batch_groups`` informative groups,
step, checkpoint, publish weight version ``step+1`` atomically and announce it, publish the next
AnnealState, and only then acknowledge the groups used. The learner also feeds the prompts stream
(``learner/feeder.py``, where admission bounds staleness) and records each step
(``learner/step_stats.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter

import redis.asyncio as aioredis
import torch

from eapo.core.config import EAPOConfig
from eapo.core.data import load_split
from eapo.core.metrics import serve_metrics
from eapo.core.timeline import Timeline
from learner.anneal import anneal_state
from learner.broadcast import Broadcaster
from learner.distill import distilled_samples
from learner.feeder import PromptFeeder
from learner.ledger import Ledger
from learner.loss import has_signal, sample_advantages
from learner.step_stats import StepLog, StepTimes, step_record, step_timing
from learner.trainer import Ranks, Trainer, TrainSample
from proto import AnnealState, Names, TrajectoryGroup, encode
from proto.streams import Entry, StreamConsumer, ensure_group, trim_acknowledged
from proto.weights import prune, verify_version, version_dir, write_version

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, cfg: EAPOConfig, client: aioredis.Redis):
        self.cfg, self.client, self.names = cfg, client, Names(cfg.redis.prefix)
        self.ledger = Ledger(client, self.names.trained, cfg.learner.dedup_horizon_s)
        self.dropped: Counter[str] = Counter()  # the run's drops by reason, restored on resume
        self.broadcaster = Broadcaster(cfg.learner.broadcast)
        self.step_log = StepLog(cfg)
        self.timeline = Timeline(cfg.run_dir if cfg.timeline else None, "learner")

    async def _publish(self, ranks: Ranks, version: int, step: int, anneal: AnnealState) -> None:
        """Write (unless a previous life already did) and announce weight version ``version``."""
        lc = self.cfg.learner
        path = version_dir(self.cfg.weights_dir, version)
        if path.exists():
            manifest = await asyncio.to_thread(verify_version, path)
        else:
            manifest = await asyncio.to_thread(
                write_version, self.cfg.weights_dir, version, step, lambda path: ranks.call("save_pretrained", path)
            )
        await self.broadcaster.send(version, path)  # before the announcement: servers hold it when it comes
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.names.weights, encode(manifest))
            pipe.set(self.names.anneal, encode(anneal))
            pipe.publish(self.names.weights_channel, str(version))
            await pipe.execute()
        self.timeline.mark("published", version=version)
        await asyncio.to_thread(prune, self.cfg.weights_dir, lc.keep_versions, await self._versions_in_use())

    async def _versions_in_use(self) -> set[int]:
        """Versions rollout replicas reported reading recently: garbage collection spares them."""
        reports = await self.client.hgetall(self.names.rollout_versions)
        horizon = time.time() - self.cfg.learner.version_report_ttl_s
        in_use = set()
        for raw in reports.values():
            try:
                report = json.loads(raw)
                if float(report["at"]) >= horizon:
                    in_use.add(int(report["version"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed rollout version report %r", raw[:200])
        return in_use

    async def _collect(self, consumer: StreamConsumer, feeder: PromptFeeder, step: int):
        """Read until ``batch_groups`` informative groups (or the per-step drop cap is hit); each comes with
        its samples' advantages."""
        lc = self.cfg.learner
        batch: list[tuple[Entry[TrajectoryGroup], list[float]]] = []
        streaks: dict[str, int] = {}  # the batch's problems' streaks, saved when the batch is acknowledged
        seen_groups: list[TrajectoryGroup] = []
        stale: list[TrajectoryGroup] = []
        dropped_now = 0
        await self.ledger.tick()
        while len(batch) < lc.batch_groups:
            await feeder.fill(step, sum(self.dropped.values()))
            if dropped_now >= lc.max_dropped_per_step and batch:
                break
            for entry in await consumer.read(count=lc.batch_groups - len(batch), block_ms=1000):
                group = entry.message
                verdict = self.ledger.verdict(group.group_id)
                if verdict != "new":  # trained before, or too old for the ledger to tell
                    await self._drop(consumer, entry, verdict)
                    continue
                seen_groups.append(group)
                streak = feeder.observe(group)
                if lc.max_version_lag is not None and step - group.min_policy_version > lc.max_version_lag:
                    stale.append(group)  # counted and reported: dropping biases against slow (consulting) groups
                    await self._drop(consumer, entry, "stale", streak)
                    continue
                # all right or all wrong as rewarded: no outcome signal
                if lc.dynamic_sampling and not has_signal(group, check_work=lc.check_work):
                    dropped_now += 1
                    if not batch and dropped_now % lc.max_dropped_per_step == 0:
                        log.warning(
                            "step %d: %d groups in a row all right or all wrong; waiting for mixed outcomes "
                            "(learner.dynamic_sampling)",
                            step,
                            dropped_now,
                        )
                    await self._drop(consumer, entry, "zero_signal", streak)
                    continue
                batch.append((entry, sample_advantages(group, lc)))
                streaks |= streak
        return batch, streaks, seen_groups, stale

    async def _drop(
        self, consumer: StreamConsumer, entry: Entry, reason: str, streak: dict[str, int] | None = None
    ) -> None:
        """Count and acknowledge in one transaction (with the problem's new streak, if any): a dropped group
        is never counted twice or lost."""
        self.dropped[reason] += 1
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.names.counters, f"dropped:{reason}", 1)
            if streak:
                pipe.hset(self.names.prompt_streaks, mapping=streak)
            pipe.xack(consumer.stream, consumer.group, entry.id)
            await pipe.execute()

    async def _resume(self, ranks: Ranks, feeder: PromptFeeder) -> int:
        """Restore step, optimizer and bookkeeping from the last checkpoint and Redis; returns the step."""
        state = await asyncio.to_thread(ranks.call, "load_checkpoint", self.cfg.checkpoint_dir) or {}
        # group_ids: the checkpoint's step may have been killed before recording what it trained
        remembered = await self.ledger.load(state.get("group_ids", []))
        counters = {k.decode(): int(v) for k, v in (await self.client.hgetall(self.names.counters)).items()}
        self.dropped = Counter({k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("dropped:")})
        await feeder.restore(counters)
        step = int(state.get("step", 0))
        if self.step_log.recover(state.get("record")):
            log.info("step %d's metrics line was lost with the learner; logged from its checkpoint", step)
        if step:
            log.info("resuming at step %d (%d trained group ids remembered)", step, remembered)
        return step

    async def run(self, ranks: Ranks) -> None:
        """Rank 0's loop (Redis, batches, publishing); the other ranks follow ``ranks``."""
        cfg, lc = self.cfg, self.cfg.learner
        serve_metrics(lc.metrics_port, cfg.metrics_host)
        consumer = StreamConsumer(
            self.client,
            self.names.trajectories,
            self.names.learner_group,
            "learner-0",
            TrajectoryGroup,
            claim_idle_ms=cfg.redis.claim_idle_ms,
            max_deliveries=cfg.redis.max_deliveries,
            counters_key=self.names.counters,
        )
        await consumer.ensure_group()
        await ensure_group(self.client, self.names.prompts, self.names.rollout_group)
        feeder = PromptFeeder(
            self.client,
            self.names,
            load_split(cfg, "train"),
            lc.seed,
            lc.batch_groups,
            lc.max_staleness,
            lc.prompt_skip_explore,
            check_work=lc.check_work,
        )
        await self.client.delete(self.names.done)
        start = await self._resume(ranks, feeder)
        if lc.broadcast.servers:
            await self.broadcaster.start()
        await self._publish(ranks, start, start, anneal_state(cfg.anneal, start))
        tok = ranks.trainer.tokenizer  # learner.internalize reads the answers' text
        t_start = time.monotonic()
        for step in range(start, lc.steps):
            anneal = anneal_state(cfg.anneal, step)
            t0 = time.monotonic()
            with self.timeline.span("wait", step=step):
                batch, streaks, seen_groups, stale = await self._collect(consumer, feeder, step)
            t_data = time.monotonic() - t0
            samples, sizes, distilled = [], [], []  # sizes: samples per group, the unit updates split on
            for entry, advantages in batch:
                group = [TrainSample.of(s, a) for s, a in zip(entry.message.samples, advantages, strict=True)]
                extra = distilled_samples(entry.message, advantages, tok, lc) if lc.internalize else []
                samples += group + extra
                sizes.append(len(group) + len(extra))
                distilled += [entry.message.prompt.prompt_id] * len(extra)
            with self.timeline.span("train", step=step):
                stats = await asyncio.to_thread(ranks.call, "step", samples, sizes)
            stats["distilled_samples"] = float(len(distilled))
            trained = [entry.message for entry, _ in batch]
            group_ids = [g.group_id for g in trained]
            now = time.monotonic()
            times = StepTimes(run_s=now - t_start, wait_s=t_data, step_s=now - t0)
            advantages = [adv for _, adv in batch]
            record = step_record(
                step,
                anneal,
                trained,
                advantages,
                seen_groups,
                stale,
                self.dropped,
                feeder.skipped,
                stats,
                times,
                lc,
                distilled,
            )
            # Durable first (checkpoint, then weights), acknowledged last: a kill anywhere in between
            # re-reads these groups on restart, and the checkpoint's group ids keep them from training twice;
            # its copy of the step's record (times up to here) is logged then if the kill came before the log line.
            with self.timeline.span("checkpoint", step=step):
                await asyncio.to_thread(
                    ranks.call,
                    "save_checkpoint",
                    cfg.checkpoint_dir,
                    step + 1,
                    {"step": step + 1, "group_ids": group_ids, "record": record},
                    lc.keep_checkpoints,
                )
            with self.timeline.span("publish", step=step):
                await self._publish(ranks, step + 1, step + 1, anneal_state(cfg.anneal, step + 1))
            async with self.client.pipeline(transaction=True) as pipe:
                self.ledger.record_trained(pipe, group_ids)
                if streaks:
                    pipe.hset(self.names.prompt_streaks, mapping=streaks)
                pipe.xack(consumer.stream, consumer.group, *[entry.id for entry, _ in batch])
                await pipe.execute()
            for stream in (self.names.trajectories, self.names.prompts):  # bounded streams in long runs
                await trim_acknowledged(self.client, stream)
            now = time.monotonic()
            times = StepTimes(run_s=now - t_start, wait_s=t_data, step_s=now - t0)
            record |= step_timing(times, stats["policy_tokens"])  # the whole step's, checkpoint and ack included
            self.step_log.write(step + 1, record)
            log.info(
                "step %d/%d loss %.4f acc %.3f calls/ep %.2f accepted %.2f (p=%.2f) version lag %.1f",
                step + 1,
                lc.steps,
                stats["loss"],
                record["accuracy"],
                record["calls_per_episode"],
                record["accepted_rate"],
                anneal.acceptance,
                record["version_lag_mean"],
            )
        await self.client.set(self.names.done, b"1")
        log.info("learner finished %d steps; final weights at version %d", lc.steps, lc.steps)


def run_learner(cfg: EAPOConfig, redis_url: str) -> None:
    """Entry point of every rank (alone, or under ``torchrun``): rank 0 drives, the others follow."""
    ranks = Ranks(Trainer(cfg.learner, cfg.policy_path))
    try:
        if ranks.rank == 0:
            _drive(cfg, redis_url, ranks)
        else:
            ranks.follow()
    finally:
        # Tear the process group down before the interpreter does: a gloo group left to the exit
        # handlers can abort the process ("terminate called without an active exception"); the barrier
        # lets every rank finish its last collective first.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _drive(cfg: EAPOConfig, redis_url: str, ranks: Ranks) -> None:

    async def drive() -> None:
        client = aioredis.Redis.from_url(redis_url)
        learner = Learner(cfg, client)
        try:
            await learner.run(ranks)
        finally:
            learner.step_log.close()
            learner.timeline.close()
            await client.aclose()

    try:
        asyncio.run(drive())
    finally:
        ranks.call("stop")
