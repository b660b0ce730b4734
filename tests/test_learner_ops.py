"""A build of DeepSpeed's op that was killed leaves torch's bare ``lock`` file behind; the next learner
must not wait on it forever (it did, silently, until the file was removed by hand)."""

import subprocess
import sys

from learner.ops import extensions_dir

LOAD = "from learner.ops import build_deepspeed_ops; build_deepspeed_ops(); print('loaded')"


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(deepspeed_ops: None):
    cache = extensions_dir()
    built = [d for d in cache.iterdir() if d.is_dir() and any(d.glob("*.so"))]
    assert built, f"the deepspeed_ops fixture built no op under {cache}"
    stale = built[0] / "lock"
    stale.touch()  # what a SIGKILL during torch's build leaves
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not stale.exists()
    assert "left by a build that did not finish" in done.stderr
