"""DeepSpeed's CPU communication op: built once per environment, and never waited on forever.

DeepSpeed compiles it on first use (minutes on a loaded machine) into torch's extension cache, keyed by
name only: two virtual environments (a clone and its origin) would each invalidate the other's build,
so the cache is the environment's own (``<venv>/torch_extensions``) unless ``TORCH_EXTENSIONS_DIR`` is
set. torch guards a build with a bare ``lock`` file: one left by a build that was killed (a Ctrl-C on
the first run) made every later learner wait on it forever, silently. We build under our own
``flock``, which the kernel releases when its holder dies: holding it, any ``lock`` file is stale.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def extensions_dir() -> Path:
    return Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))


def build_deepspeed_ops() -> None:
    """Build (or load from the cache) the op this machine's accelerator uses, one process at a time."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".eapo-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for stale in root.glob("*/lock"):
            log.warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        builder.load()
