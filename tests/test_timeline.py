"""The timeline a run records, and the figures benchmarks.async_speedup draws from it, by hand."""

from __future__ import annotations

import pytest

from benchmarks.async_speedup import busy_fraction, mean_overlap, serving_delays
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


def test_busy_share_is_the_union_of_overlapping_spans_clipped_to_the_window():
    spans = [(0.0, 4.0), (2.0, 3.0), (3.5, 6.0), (8.0, 9.0), (11.0, 20.0)]
    # window [1, 10]: busy 1–6 (nested and overlapping spans count once) and 8–9: 6 of 9 seconds
    assert busy_fraction(spans, 1.0, 10.0) == pytest.approx(6 / 9)
    # in flight on average: 3 + 1 + 2.5 + 1 span-seconds over 9 seconds
    assert mean_overlap(spans, 1.0, 10.0) == pytest.approx(7.5 / 9)


def test_a_skipped_version_waits_for_the_first_newer_one_served():
    published = {1: 10.0, 2: 20.0, 3: 21.0, 4: 30.0}
    loaded = [(1, 10.3), (3, 22.0), (4, 30.1)]  # version 2 never loaded: 3 came first
    assert serving_delays(published, loaded, range(1, 5)) == pytest.approx([0.3, 2.0, 1.0, 0.1])
    assert serving_delays(published, [(1, 10.3)], range(1, 3)) == pytest.approx([0.3])  # 2 not served yet
