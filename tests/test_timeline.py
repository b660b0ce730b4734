"""The timeline a run records for benchmarks.async_speedup: spans close even on error, marks are instants,
a disabled timeline writes nothing, and a line cut by a kill does not break the reader."""

from __future__ import annotations

import pytest

from eapo.core.timeline import Timeline, read_timeline


def test_spans_and_marks_are_written_one_line_each_and_a_cut_line_is_skipped(tmp_path):
    timeline = Timeline(tmp_path, "learner")
    with timeline.span("train", step=3):
        pass
    with pytest.raises(RuntimeError), timeline.span("publish", step=3):
        raise RuntimeError("killed mid-publish")
    timeline.mark("published", version=4)
    timeline.close()
    path = tmp_path / "timeline" / "learner.jsonl"
    with open(path, "a") as f:
        f.write('{"what": "wait", "t0": 1')  # a kill in mid-write
    records = read_timeline(path)
    assert [(r["what"], r.get("step"), r.get("version")) for r in records] == [
        ("train", 3, None),
        ("publish", 3, None),
        ("published", None, 4),
    ]
    assert all(r["t1"] >= r["t0"] for r in records[:2]) and "t" in records[2]


def test_a_timeline_without_a_run_dir_records_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    timeline = Timeline(None, "rollout-0")
    with timeline.span("group"):
        timeline.mark("first_sample", version=1)
    timeline.close()
    assert list(tmp_path.iterdir()) == []
