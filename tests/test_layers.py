"""The package's layers (docs/architecture.md): imports point down only, services never reach dev code."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("proto", "expert_gateway", "rollout_service", "learner")


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: the layers, and a gateway without torch."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", done.stdout), done.stdout[-2000:]


def test_no_service_names_the_world_the_embedded_redis_or_the_cli():
    """The same rule by text, so a module named in a string (``python -m``, ``importlib``) is caught too."""
    banned = re.compile(r"\b(eapo\.dev|eapo\.cli|eapo\.experiment)\b|from eapo import (dev|cli|experiment)\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in SERVICES
        for path in sorted((ROOT / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert not offenders, "\n".join(offenders)
