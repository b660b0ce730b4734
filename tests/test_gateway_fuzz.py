"""Property-based fuzzing of the gateway's own OpenAPI schema (schemathesis + hypothesis): whatever the
request, the gateway answers with a clear 4xx or a success, never a 5xx of its own making.

The one fake backend stays healthy, so no 5xx is an upstream's. Adding backends is left out: a fuzzed
URL would send traffic off this machine. Seeded (``derandomize``), bounded in examples."""

import pytest
import schemathesis
from helpers import FakeBackend, ServerThread
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from eapo.config import ExpertBackend, GatewayConfig
from eapo.redis_server import free_port
from expert_gateway.app import create_app

SCHEMA = schemathesis.openapi.from_dict(create_app(GatewayConfig()).openapi())
OPERATIONS = {
    op.label: op
    for op in (result.ok() for result in SCHEMA.get_all_operations())
    if (op.method.upper(), op.path) != ("POST", "/admin/backends")
}


@pytest.fixture(scope="module")
def gateway_url():
    with FakeBackend("a") as backend:
        cfg = GatewayConfig(backends=[ExpertBackend(model="expert", url=backend.url)], max_body_bytes=64 * 1024)
        with ServerThread(create_app(cfg), free_port()) as gw:
            yield gw.url


CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label, op in sorted(OPERATIONS.items()) if len(op.body) or len(op.query)
]  # a request without parameters or body cannot be made invalid


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_request_makes_the_gateway_fail(gateway_url, label, mode):
    """Positive: requests the schema allows; negative: requests it forbids (wrong types, missing fields)."""
    seen: list[int] = []

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=gateway_url, timeout=10)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.path, case.query, case.body, response.status_code, response.text)
        if response.status_code >= 400:  # says what is wrong, in OpenAI's error shape or FastAPI's
            body = response.json()
            assert body.get("error", {}).get("message") or body.get("detail"), response.text

    check()
    assert seen  # the strategy produced requests and every one was sent
