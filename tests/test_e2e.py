"""The whole loop through real processes: `eapo up` with a private Redis, an expert server, the
gateway, the learner and a rollout replica, on the fast test world. Slowest test: runs last."""

import json
import re
import signal

import pytest
from stack import port_free

from eapo.core.timeline import read_timeline
from proto.weights import published_versions, verify_version, version_dir

pytestmark = pytest.mark.e2e


def test_eapo_up_trains_publishes_and_stops_cleanly(stack):
    stack.write(
        learner={"steps": 4, "keep_versions": 3, "max_staleness": 1, "internalize": True},
        rollout={"group_size": 4, "max_groups_in_flight": 4},
        timeline=True,
    )
    with stack.up() as proc:
        out = stack.finish(proc, timeout_s=600)
    run_dir = stack.run_dir

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"]
    assert summary["exit_codes"]["learner"] == 0 and summary["exit_codes"]["rollout-0"] == 0
    resolved = stack.resolved()
    assert resolved["learner"]["steps"] == 4 and resolved["redis"]["url"].startswith("redis://127.0.0.1:")

    metrics = stack.metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["groups_trained"] >= 1 and m["policy_tokens"] > 0 for m in metrics)  # trajectories flowed
    # learner.internalize ran in the learner process and is reported (whether a right direct consultation came
    # up in 4 steps is chance: tests/test_distill.py and test_learner_ranks.py check what it trains)
    assert all("distilled_samples" in m for m in metrics)
    assert metrics[-1]["policy_version_max"] >= 1  # the rollout picked up weights the learner published
    assert re.search(r"step\s+4/4 .*calls/ep", out)  # progress was shown

    weights = run_dir / "weights"
    assert published_versions(weights) == [2, 3, 4]  # v0, v1 pruned (keep 3)
    for v in (2, 3, 4):
        assert verify_version(version_dir(weights, v)).version == v
    assert "policy weights now at version" in (run_dir / "logs" / "rollout-0.log").read_text()

    # the timeline benchmarks.async_speedup reads: every step's phases, each version's publication, and
    # the rollout's loads, newest-first never undone
    learner = read_timeline(run_dir / "timeline" / "learner.jsonl")
    rollout = read_timeline(run_dir / "timeline" / "rollout-0.jsonl")
    for what in ("wait", "train", "checkpoint", "publish"):
        assert sorted(r["step"] for r in learner if r["what"] == what) == [0, 1, 2, 3]
    published = {r["version"]: r["t"] for r in learner if r["what"] == "published"}
    assert sorted(published) == [0, 1, 2, 3, 4]
    loaded = [r["version"] for r in rollout if r["what"] == "load_weights"]
    assert loaded and loaded == sorted(set(loaded)) and set(loaded) <= set(published)
    assert sum(r["what"] == "group" for r in rollout) >= sum(m["groups_read"] for m in metrics)


def test_ctrl_c_stops_every_process_and_releases_ports(stack):
    stack.write(learner={"steps": 500})
    with stack.up() as proc:
        stack.wait(lambda: stack.last_step() > 0, 300, "a first learner step", alive=(proc,), interval_s=0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, stack.output(proc, 4000)
    assert "interrupted" in stack.output(proc)
    summary = json.loads((stack.run_dir / "summary.json").read_text())
    assert not summary["ok"]
    assert all(code is not None for code in summary["exit_codes"].values())  # every child was reaped
    resolved = stack.resolved()
    ports = [resolved["gateway"]["port"]] + [int(b["url"].rsplit(":", 1)[1]) for b in resolved["gateway"]["backends"]]
    ports.append(int(resolved["redis"]["url"].rsplit(":", 1)[1].split("/")[0]))
    assert [port for port in ports if not port_free(port)] == [], "ports still held after Ctrl-C"
