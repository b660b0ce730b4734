"""The whole loop through real processes: `eapo up` with a private Redis, two expert servers, the
gateway, the learner and a rollout replica, on the fast test world. Slowest test: runs last."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from proto.weights import published_versions, verify_version, version_dir

pytestmark = pytest.mark.e2e


def test_eapo_up_trains_publishes_and_stops_cleanly(tiny_world, tmp_path):
    run_dir = tmp_path / "run"
    config = {
        "run_dir": str(run_dir),
        "world": tiny_world.model_dump(mode="json"),
        "learner": {"steps": 4, "batch_groups": 2, "keep_versions": 3, "max_staleness": 1, "dynamic_sampling": False},
        "rollout": {"group_size": 4, "max_groups_in_flight": 4, "max_new_tokens": 32},
        # the barely trained test world never solves a problem: keep its zero-signal groups (the plumbing,
        # not learning, is under test), a consultation penalty giving them an advantage
        "anneal": {"penalty": {"kind": "constant", "start": 0.1, "end": 0.1}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "eapo.cli", "up", "--config", str(path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"]
    assert summary["exit_codes"]["learner"] == 0 and summary["exit_codes"]["rollout-0"] == 0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["learner"]["steps"] == 4 and resolved["redis"]["url"].startswith("redis://127.0.0.1:")

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["groups_trained"] >= 1 and m["policy_tokens"] > 0 for m in metrics)  # trajectories flowed
    assert metrics[-1]["policy_version_max"] >= 1  # the rollout picked up weights the learner published
    assert re.search(r"step\s+4/4 .*calls/ep", proc.stdout)  # progress was shown

    weights = run_dir / "weights"
    assert published_versions(weights) == [2, 3, 4]  # v0, v1 pruned (keep 3)
    for v in (2, 3, 4):
        assert verify_version(version_dir(weights, v)).version == v
    assert "policy weights now at version" in (run_dir / "logs" / "rollout-0.log").read_text()


def test_ctrl_c_stops_every_process_and_releases_ports(tiny_world, tmp_path):
    run_dir = tmp_path / "run"
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "world": tiny_world.model_dump(mode="json"),
                "learner": {"steps": 500, "batch_groups": 2, "dynamic_sampling": False},
                "anneal": {"penalty": {"kind": "constant", "start": 0.1, "end": 0.1}},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "eapo.cli", "up", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no learner step within 300s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["ok"]
    assert all(code is not None for code in summary["exit_codes"].values())  # every child was reaped
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    ports = [resolved["gateway"]["port"]] + [int(b["url"].rsplit(":", 1)[1]) for b in resolved["gateway"]["backends"]]
    ports.append(int(resolved["redis"]["url"].rsplit(":", 1)[1].split("/")[0]))
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served after Ctrl-C"
