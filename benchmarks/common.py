"""What every benchmark shares: the machine description, the table, the JSON file."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    mem = None
    with contextlib.suppress(ValueError, OSError):
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": mem,
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_result(name: str, config: dict, raw: dict, summary: dict, targets: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": name,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine(),
                "config": config,
                "raw": raw,
                "summary": summary,
                "targets": targets,
            },
            indent=2,
        )
    )
    print(f"\nwrote {path}")
    return path


def named_path(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` on a command line, PATH a checkpoint directory."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=PATH with PATH a checkpoint directory")
    return name, Path(path)
