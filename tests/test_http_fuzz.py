"""Property-based fuzzing of our HTTP services' own OpenAPI schemas (schemathesis + hypothesis) — the
gateway and the CPU OpenAI-compatible server: whatever the request, a clear 4xx or a success, never a
5xx of the service's own making.

The gateway's one fake backend stays healthy, so no 5xx is an upstream's. Adding backends is left out:
a fuzzed URL would send traffic off this machine. Seeded (``derandomize``), bounded in examples."""

from pathlib import Path

import pytest
import schemathesis
from helpers import FakeBackend, ServerThread
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from eapo.core.config import ExpertBackend, ExpertServerConfig, GatewayConfig
from eapo.core.net import free_port
from eapo.inference import cpu_server as expert_server
from expert_gateway.app import create_app

SKIP = {("POST", "/admin/backends")}
APPS = {
    "gateway": create_app(GatewayConfig()),
    "expert-server": expert_server.create_app(ExpertServerConfig(), Path("unused")),
}
OPERATIONS = {
    (service, op.label): op
    for service, app in APPS.items()
    for op in (result.ok() for result in schemathesis.openapi.from_dict(app.openapi()).get_all_operations())
    if (op.method.upper(), op.path) not in SKIP
}


@pytest.fixture(scope="module")
def servers(world_dir):
    with FakeBackend("a") as backend:
        cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=backend.url)], max_body_bytes=64 * 1024)
        with (
            ServerThread(create_app(cfg), free_port()) as gw,
            ServerThread(expert_server.create_app(ExpertServerConfig(), world_dir / "expert"), free_port()) as expert,
        ):
            yield {"gateway": gw.url, "expert-server": expert.url}


CASES = [(key, GenerationMode.POSITIVE) for key in sorted(OPERATIONS)] + [
    (key, GenerationMode.NEGATIVE) for key, op in sorted(OPERATIONS.items()) if len(op.body) or len(op.query)
]  # a request without parameters or body cannot be made invalid


@pytest.mark.parametrize(("key", "mode"), CASES, ids=[f"{k[0]} {k[1]}-{m.value}" for k, m in CASES])
def test_no_request_makes_a_service_fail(servers, key, mode):
    """Positive: requests the schema allows; negative: requests it forbids (wrong types, missing fields)."""
    seen: list[int] = []

    @given(case=OPERATIONS[key].as_strategy(generation_mode=mode))
    @settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=servers[key[0]], timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.path, case.query, case.body, response.status_code, response.text)
        if response.status_code >= 400:  # says what is wrong, in OpenAI's error shape or FastAPI's
            body = response.json()
            assert body.get("error", {}).get("message") or body.get("detail"), response.text

    check()
    assert seen  # the strategy produced requests and every one was sent
