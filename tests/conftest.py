"""Shared fixtures: a real Redis server, a fast tiny world, loopback ports."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from helpers import ServerThread
from stack import Stack

from eapo.core.config import ModelSpec, WorldConfig
from eapo.dev.redis_server import RedisServer
from eapo.dev.world.bootstrap import bootstrap
from learner.ops import build_deepspeed_ops, extensions_dir

extensions_dir()  # one op cache per environment, inherited by every process a test starts (learner/ops.py)


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """Build DeepSpeed's op once, here, before any learner process needs it: a learner's first step is
    awaited with a bound sized for training, not for a compiler (after the first run: a cache hit)."""
    build_deepspeed_ops()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer):
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A fresh namespace per test, so tests sharing the server never see each other's streams."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, deepspeed_ops: None) -> WorldConfig:
    """A world built in seconds: same code path as the real bootstrap, far fewer SFT steps."""
    cfg = WorldConfig(
        dir=tmp_path_factory.mktemp("world"),
        train_problems=64,
        eval_problems=16,
        policy=ModelSpec(curriculum="policy", hidden=64, layers=2, sft_steps=30),
        experts={
            "expert": ModelSpec(curriculum="solver", hidden=64, layers=2, sft_steps=30),
            "calculator": ModelSpec(curriculum="calculator", hidden=32, layers=1, sft_steps=10),
        },
        sft_batch=16,
    )
    bootstrap(cfg)
    return cfg


@pytest.fixture(scope="session")
def world_dir(tiny_world: WorldConfig) -> Path:
    return Path(tiny_world.dir)


@pytest.fixture(scope="session")
def expert_servers(world_dir: Path):
    """Two CPU expert servers serving the tiny world's expert under the name 'expert', as configured by default."""
    from eapo.core.config import ExpertServerConfig
    from eapo.core.net import free_port
    from eapo.inference.cpu_server import create_app

    with (
        ServerThread(create_app(ExpertServerConfig(seed=1), world_dir / "expert"), free_port()) as a,
        ServerThread(create_app(ExpertServerConfig(seed=2), world_dir / "expert"), free_port()) as b,
    ):
        yield [a.url, b.url]


@pytest.fixture(scope="session")
def gateway(expert_servers: list[str]):
    from eapo.core.config import ExpertBackend, GatewayConfig
    from eapo.core.net import free_port
    from expert_gateway.app import create_app

    cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=u) for u in expert_servers], max_queries=4)
    with ServerThread(create_app(cfg), free_port()) as server:
        yield server.url


@pytest.fixture
def stack(tiny_world: WorldConfig, tmp_path: Path, prefix: str):
    """A real stack on the test world (``tests/stack.py``); whatever it started is stopped afterwards."""
    with Stack(tiny_world, tmp_path, prefix) as s:
        yield s


def pytest_collection_modifyitems(config, items):
    """The fast tests first, then the slowest: those marked ``slow``, tests on real vLLM (``vllm``), and
    last the end-to-end tests (``e2e``). The sort is stable: within a rank, files keep their order."""

    def rank(item: pytest.Item) -> tuple[bool, bool, bool]:
        marked = {m: item.get_closest_marker(m) is not None for m in ("e2e", "vllm", "slow")}
        return marked["e2e"], marked["vllm"], marked["slow"]

    items.sort(key=rank)
