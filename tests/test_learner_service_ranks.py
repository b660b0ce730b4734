"""`eapo learner` under torchrun with 2 ranks trains the same stream to the same losses as 1 rank, and
mirrors its metrics to TensorBoard when asked."""

import json
import os
import subprocess

import numpy as np
import pytest
import redis
import yaml
from helpers import group, torchrun
from test_tracking import tensorboard_scalars

from proto import encode
from proto.streams import FIELD
from proto.weights import published_versions

pytestmark = pytest.mark.e2e
STEPS = 3


def run_learner(tiny_world, redis_server, tmp_path, prefix: str, ranks: int, groups) -> list[dict]:
    client = redis.Redis.from_url(redis_server.url)
    for g in groups:
        client.xadd(f"{prefix}:stream:trajectories", {FIELD: encode(g)})
    client.close()
    run_dir = tmp_path / f"run-{ranks}"
    config = tmp_path / f"learner-{ranks}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "world": tiny_world.model_dump(mode="json"),
                "redis": {"prefix": prefix},
                "learner": {"steps": STEPS, "batch_groups": 2, "zero_stage": 2},
                "tracking": {"tensorboard": True},
            }
        )
    )
    launcher = [*torchrun(ranks), "-m"]
    proc = subprocess.run(
        [*launcher, "eapo.cli", "learner", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "REDIS_URL": redis_server.url},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert published_versions(run_dir / "weights")[-1] == STEPS
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_learner_matches_one_rank(tiny_world, redis_server, tmp_path, prefix):
    rng = np.random.default_rng(3)
    groups = [group(rng, [1.0, 0.0, 1.0, 0.0]) for _ in range(2 * STEPS)]
    one = run_learner(tiny_world, redis_server, tmp_path, prefix + "a", 1, groups)
    two = run_learner(tiny_world, redis_server, tmp_path, prefix + "b", 2, groups)
    assert [r["group_ids"] for r in one] == [r["group_ids"] for r in two]  # same batches, in order
    for a, b in zip(one, two, strict=True):
        assert b["policy_tokens"] == a["policy_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    # rank 0 mirrored every step to TensorBoard
    tensorboard = tensorboard_scalars(tmp_path / "run-1" / "tensorboard" / "learner")
    assert tensorboard["learner/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in one]
