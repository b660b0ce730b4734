"""Who is busy when: spans and marks appended to ``<run_dir>/timeline/<process>.jsonl``.

Off by default (``timeline: true`` turns it on). ``benchmarks/async_speedup`` reads the files to measure
idle ratios and the delay from each weight version's publication to the rollout serving it, and to
draw the picture of rollout and learner overlapping. Times are wall-clock (``time.time()``): the
processes of one machine share that clock, and the files of different processes are compared by it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


class Timeline:
    """One process's record; ``Timeline(None, …)`` records nothing, so call sites need no condition."""

    def __init__(self, run_dir: Path | None, process: str):
        self._file: TextIO | None = None
        if run_dir is not None:
            path = run_dir / "timeline" / f"{process}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - one line per record, kept open

    def _write(self, record: dict[str, object]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")

    @contextmanager
    def span(self, what: str, **fields: object) -> Iterator[None]:
        """Record ``what`` as busy from entry to exit (an exception still closes the span)."""
        t0 = time.time()
        try:
            yield
        finally:
            self._write({"what": what, "t0": round(t0, 4), "t1": round(time.time(), 4), **fields})

    def mark(self, what: str, **fields: object) -> None:
        """Record an instant, e.g. a version published."""
        self._write({"what": what, "t": round(time.time(), 4), **fields})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_timeline(path: Path) -> list[dict[str, object]]:
    """The records of one process's file; a line cut by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
