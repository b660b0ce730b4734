"""How the learner's checkpoints are named on disk: the trainer writes them, the supervisor (``eapo up``)
reads how far a run got. No torch here, so the supervisor imports it cheaply."""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"  # the file naming the newest complete checkpoint, replaced once that one is whole
PREFIX = "step"


def checkpoint_tag(step: int) -> str:
    """The directory of the checkpoint after ``step`` learner steps; zero-padded, so names sort by step."""
    return f"{PREFIX}{step:06d}"


def latest_step(root: Path) -> int:
    """The step of the newest complete checkpoint under ``root``; 0 when there is none (or it is unreadable)."""
    try:
        return int((Path(root) / LATEST).read_text().strip().removeprefix(PREFIX))
    except (OSError, ValueError):
        return 0
