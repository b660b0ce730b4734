"""Tracking sinks write what metrics.jsonl holds: read back from TensorBoard's event files and from W&B's
offline run file."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eapo.core.config import EAPOConfig
from eapo.core.tracking import Tracker, scalars

RECORDS = [
    {"step": 1, "loss": 0.5, "dropped": {"zero_signal": 3}, "group_ids": ["a"], "ok": True, "note": "x"},
    {"step": 2, "loss": 0.25, "dropped": {"zero_signal": 4}, "group_ids": ["b"], "ok": True, "f1": None},
]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """The protobuf ``Record``s of W&B's offline run file: a LevelDB-style log (a 7-byte header, then 32 KiB
    blocks of records: crc32, length, type full/first/middle/last); wandb no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block = path.read_bytes(), 7, 32768
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        records.append(wandb_internal_pb2.Record())
        records[-1].ParseFromString(chunk)
    return records


def wandb_history(run_dir: Path, timeout_s: float = 120.0) -> list[dict[str, str]]:
    """The history rows, once W&B's service has written the run's exit record (it writes after finish())."""
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_dir)):
        assert time.monotonic() < deadline, "W&B never closed its offline run file"
        time.sleep(0.1)
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in wandb_records(run_dir)
        if r.WhichOneof("record_type") == "history"
    ]


def test_scalars_flatten_numbers_and_leave_out_the_rest():
    assert scalars(RECORDS[0]) == {"step": 1.0, "loss": 0.5, "dropped/zero_signal": 3.0}


def test_tensorboard_and_wandb_receive_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = EAPOConfig(run_dir=tmp_path / "run", tracking={"tensorboard": True, "wandb": True})
    tracker = Tracker(cfg, "learner")
    for record in RECORDS:
        tracker.log(record, record["step"])
    tracker.close()

    tb = tensorboard_scalars(cfg.run_dir / "tensorboard" / "learner")
    assert tb["learner/loss"] == [(1, 0.5), (2, 0.25)]
    assert tb["learner/dropped/zero_signal"] == [(1, 3.0), (2, 4.0)]
    assert "learner/note" not in tb and "learner/ok" not in tb

    rows = wandb_history(cfg.run_dir)
    assert [(r["_step"], float(r["learner/loss"])) for r in rows] == [("1", 0.5), ("2", 0.25)]
    assert [float(r["learner/dropped/zero_signal"]) for r in rows] == [3.0, 4.0]


def test_sinks_are_off_by_default(tmp_path):
    cfg = EAPOConfig(run_dir=tmp_path / "run")
    tracker = Tracker(cfg, "learner")
    tracker.log(RECORDS[0], 1)
    tracker.close()
    assert not (cfg.run_dir / "tensorboard").exists() and not (cfg.run_dir / "wandb").exists()


def test_unknown_wandb_mode_is_refused():
    with pytest.raises(ValueError, match="offline"):
        EAPOConfig(tracking={"wandb": True, "wandb_mode": "disabled"})


def test_a_failing_sink_is_dropped_and_the_others_keep_logging(tmp_path, monkeypatch, caplog):
    """A mirror never stops training: W&B raising (a full disk, a dead service process) costs W&B only."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = EAPOConfig(run_dir=tmp_path / "run", tracking={"tensorboard": True, "wandb": True})
    tracker = Tracker(cfg, "learner")
    real_wandb = tracker._wandb

    class Broken:
        def log(self, *args, **kwargs):
            raise OSError("No space left on device")

    tracker._wandb = Broken()
    for record in RECORDS:
        tracker.log(record, record["step"])
    tracker._wandb = real_wandb
    tracker.close()
    assert tensorboard_scalars(cfg.run_dir / "tensorboard" / "learner")["learner/loss"] == [(1, 0.5), (2, 0.25)]
    assert sum("wandb sink failed at step 1" in r.getMessage() for r in caplog.records) == 1
