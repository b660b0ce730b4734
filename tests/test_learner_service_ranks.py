"""`eapo learner` under torchrun with 2 ranks trains the same stream to the same losses as 1 rank, and
mirrors its metrics to TensorBoard when asked."""

import json
import os
import subprocess
from pathlib import Path

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


def start_learner(tiny_world, redis_server, tmp_path, prefix: str, ranks: int, groups) -> subprocess.Popen[bytes]:
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
    with open(tmp_path / f"learner-{ranks}.log", "w") as log:  # a file, not a pipe: nobody reads it meanwhile
        return subprocess.Popen(
            [*torchrun(ranks), "-m", "eapo.cli", "learner", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "REDIS_URL": redis_server.url},
        )


def metrics_of(proc: subprocess.Popen[bytes], tmp_path: Path, ranks: int) -> list[dict]:
    assert proc.wait(timeout=300) == 0, (tmp_path / f"learner-{ranks}.log").read_text()[-5000:]
    run_dir = tmp_path / f"run-{ranks}"
    assert published_versions(run_dir / "weights")[-1] == STEPS
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_learner_matches_one_rank(tiny_world, redis_server, tmp_path, prefix):
    rng = np.random.default_rng(3)
    groups = [group(rng, [1.0, 0.0, 1.0, 0.0]) for _ in range(2 * STEPS)]
    # side by side (separate streams and run directories): the 2-core machine's time is the bound
    runs = {
        ranks: start_learner(tiny_world, redis_server, tmp_path, prefix + str(ranks), ranks, groups) for ranks in (1, 2)
    }
    try:
        one, two = (metrics_of(runs[r], tmp_path, r) for r in (1, 2))
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    assert [r["group_ids"] for r in one] == [r["group_ids"] for r in two]  # same batches, in order
    for a, b in zip(one, two, strict=True):
        assert b["policy_tokens"] == a["policy_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    # rank 0 mirrored every step to TensorBoard
    tensorboard = tensorboard_scalars(tmp_path / "run-1" / "tensorboard" / "learner")
    assert tensorboard["learner/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in one]
