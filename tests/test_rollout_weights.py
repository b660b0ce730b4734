"""A rollout replica picks up a newly published version while every group slot is busy: loading runs
beside generation, not when a slot frees (the stall the async benchmark's timeline showed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from eapo.core.config import EAPOConfig
from eapo.inference.model import load_model
from eapo.inference.sampling import SampleRequest, SampleResult
from proto import AnnealState, Names, PromptTask, TrajectoryGroup, WeightManifest, decode, encode
from proto.streams import FIELD, StreamProducer
from rollout_service import service as rollout

pytestmark = pytest.mark.asyncio


class HeldEngine:
    """Samples one answer turn, but only once ``release`` is set; records the versions it loads."""

    def __init__(self, tokenizer):
        self.tokenizer, self.version = tokenizer, 0
        self.sampling, self.release = asyncio.Event(), asyncio.Event()
        self.loaded: list[int] = []

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        self.sampling.set()
        await self.release.wait()
        ids = [*self.tokenizer.encode("\\boxed{2}"), self.tokenizer.eos_token_id]
        return SampleResult(ids, [-0.1] * len(ids), "stop", None), self.version

    async def load_version(self, version: int, path: Path) -> None:
        self.loaded.append(version)
        self.version = version

    async def close(self) -> None:
        pass


async def until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def manifest(version: int) -> bytes:
    return encode(WeightManifest(version=version, step=version, created_at=time.time(), files={}))


async def test_a_version_published_while_every_slot_is_busy_is_loaded_at_once(
    redis_client, redis_server, prefix, world_dir, tmp_path, monkeypatch
):
    engine = HeldEngine(load_model(world_dir / "policy")[1])

    async def open_engine(cfg, weights, version):
        return engine

    monkeypatch.setattr(rollout, "open_engine", open_engine)
    cfg = EAPOConfig(
        run_dir=tmp_path,
        redis={"url": redis_server.url, "prefix": prefix},
        rollout={"group_size": 1, "max_groups_in_flight": 1, "consult": False},
    )
    names = Names(prefix)
    await redis_client.set(names.weights, manifest(0))
    await redis_client.set(names.anneal, encode(AnnealState(step=0, acceptance=1, budget=1, penalty=0)))
    prompts = StreamProducer(redis_client, names.prompts, [names.rollout_group], high_water=100)
    await prompts.send(PromptTask(prompt_id="p@0", problem="1+1", answer="2"))
    replica = rollout.RolloutService(cfg, redis_client)
    task = asyncio.create_task(replica.run())
    try:
        await asyncio.wait_for(engine.sampling.wait(), 60)  # the only slot is now held by a group
        await redis_client.set(names.weights, manifest(1))
        await until(lambda: engine.loaded == [1])
        assert not engine.release.is_set() and replica.groups_done == 0  # loaded while the group still ran
        engine.release.set()
        await until(lambda: replica.groups_done == 1)
    finally:
        await redis_client.set(names.done, b"1")
        await asyncio.wait_for(task, 60)
    [(_, fields)] = await redis_client.xrange(names.trajectories)
    assert decode(fields[FIELD], TrajectoryGroup).prompt.prompt_id == "p@0"  # the held group was delivered
