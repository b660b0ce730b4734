"""`eapo learner` under torchrun with 2 ranks trains the same stream to the same losses as 1 rank, and
mirrors its metrics to TensorBoard when asked."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml
from helpers import group, side_by_side, torchrun
from test_tracking import tensorboard_scalars

from proto import encode
from proto.streams import FIELD
from proto.weights import published_versions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # two launches, side by side
STEPS = 3


def learner(tiny_world, redis_server, tmp_path, prefix: str, ranks: int, groups) -> list[str]:
    """The stream filled with ``groups`` under ``prefix``; the command line of a ``ranks``-rank learner."""
    client = redis.Redis.from_url(redis_server.url)
    for g in groups:
        client.xadd(f"{prefix}:stream:trajectories", {FIELD: encode(g)})
    client.close()
    config = tmp_path / f"learner-{ranks}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / f"run-{ranks}"),
                "world": tiny_world.model_dump(mode="json"),
                "redis": {"prefix": prefix},
                "learner": {"steps": STEPS, "batch_groups": 2, "zero_stage": 2},
                "tracking": {"tensorboard": True},
            }
        )
    )
    return [*torchrun(ranks), "-m", "eapo.cli", "learner", "--config", str(config)]


def metrics(run_dir: Path) -> list[dict]:
    assert published_versions(run_dir / "weights")[-1] == STEPS
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_learner_matches_one_rank(tiny_world, redis_server, tmp_path, prefix):
    rng = np.random.default_rng(3)
    groups = [group(rng, [1.0, 0.0, 1.0, 0.0]) for _ in range(2 * STEPS)]
    # side by side: separate streams and run directories
    launches = {f"learner-{n}": learner(tiny_world, redis_server, tmp_path, f"{prefix}{n}", n, groups) for n in (1, 2)}
    side_by_side(launches, tmp_path, timeout_s=400, env={**os.environ, "REDIS_URL": redis_server.url})
    one, two = metrics(tmp_path / "run-1"), metrics(tmp_path / "run-2")
    assert [r["group_ids"] for r in one] == [r["group_ids"] for r in two]  # same batches, in order
    for a, b in zip(one, two, strict=True):
        assert b["policy_tokens"] == a["policy_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    # rank 0 mirrored every step to TensorBoard
    tensorboard = tensorboard_scalars(tmp_path / "run-1" / "tensorboard" / "learner")
    assert tensorboard["learner/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in one]
