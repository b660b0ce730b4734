"""Packaging per role: a plain ``pip install .`` runs the gateway.

The gateway runs in a process where only what ``pip install .`` brings is importable: every other
installed distribution (torch, transformers, DeepSpeed, matplotlib, vLLM, httpx, aiohttp, …) is hidden
with ``sys.modules[name] = None``. It starts through the production entrypoint (``eapo gateway``), proxies
a chat completion and a consult batch to a fake vLLM pod, and serves its metrics. ``dev`` must pull in
every role's extra; tests/test_k8s.py checks that the Dockerfile's ``gateway`` target installs only ``.``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import httpx
import yaml
from helpers import FakeBackend, wait_for
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from eapo.core.net import free_port

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = ("torch", "transformers", "deepspeed", "matplotlib", "vllm")
OURS = {"eapo", "proto", "expert_gateway", "rollout_service", "learner", "tests", "benchmarks"}

# Hides every module named in argv[1] (a JSON list; those the interpreter's start-up already imported
# stay), then runs the CLI with the remaining arguments.
HIDDEN_RUN = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules.setdefault(name, None)
from eapo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def closure(requirements: list[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """The installed distributions ``requirements`` pull in, recursively, with their extras' markers."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras) for r in requirements]
    while todo:
        req, wanted = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
            continue
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        todo.extend((Requirement(r), frozenset(req.extras)) for r in requires)
    return {key.split("[")[0] for key in seen}


@cache
def hidden_modules() -> list[str]:
    """Every installed top-level module that ``pip install .`` does not bring."""
    base = closure(PROJECT["dependencies"]) | {"eapo"}
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if module not in OURS
        and module.isidentifier()
        and not {canonicalize_name(d) for d in dists} & base
        and module not in sys.stdlib_module_names
    )


def test_the_base_install_carries_none_of_the_heavy_roles():
    base = closure(PROJECT["dependencies"])
    assert not base & set(HEAVY), base & set(HEAVY)
    assert set(HEAVY) <= set(hidden_modules())  # the dev venv has them all: the run below hides them


def test_the_dev_extra_pulls_in_every_role():
    """``.ci/setup`` installs ``.[dev]``, and the whole suite needs every role."""
    extras = PROJECT["optional-dependencies"]
    reached, todo = set(), ["dev"]
    while todo:
        for req in map(Requirement, extras[todo.pop()]):
            if canonicalize_name(req.name) == "eapo":
                todo.extend(req.extras - reached)
                reached |= req.extras
    assert {"rollout", "learner", "stack", "experiment", "tracking"} <= reached, reached


def hidden_cli(*args: str, **kwargs) -> subprocess.Popen:
    argv = [sys.executable, "-c", HIDDEN_RUN, json.dumps(hidden_modules()), *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def ready(gateway: subprocess.Popen, url: str) -> bool:
    assert gateway.poll() is None, gateway.communicate()[1][-4000:]  # it must not have exited
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_gateway_help_runs_without_the_heavy_roles():
    out, err = hidden_cli("gateway", "--help").communicate(timeout=120)
    assert "run the expert gateway" in out, err


def test_gateway_serves_with_only_the_base_install(tmp_path):
    with FakeBackend("a") as backend:
        port = free_port()
        config = {"gateway": {"port": port, "backends": [{"model": "expert", "url": backend.url}]}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        gateway = hidden_cli("gateway", "--config", str(tmp_path / "config.yaml"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: ready(gateway, url), 60, "the gateway's readiness", interval_s=0.05)
            chat = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "expert", "messages": [{"role": "user", "content": "1"}]},
                timeout=30,
            )
            assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text
            consult = httpx.post(f"{url}/v1/consult", json={"model": "expert", "queries": ["q1", "q2"]}, timeout=30)
            assert consult.status_code == 200, consult.text
            assert [r["error"] for r in consult.json()["results"]] == [None, None], consult.text
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
            assert 'eapo_gateway_requests_total{outcome="200",route="chat"} 1.0' in metrics
        finally:
            gateway.terminate()
            _, err = gateway.communicate(timeout=30)
    assert "Traceback" not in err, err[-4000:]
