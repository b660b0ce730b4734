"""Small file writes other processes read while they happen."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``: a reader sees the old content
    or the new, never a truncated file (a plain write truncates first)."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.tmp")
    partial.write_text(text)
    os.replace(partial, path)
