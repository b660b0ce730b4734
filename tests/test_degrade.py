"""Appendix E's robustness settings served by the gateway: by hand, by rate, and through a real gateway in
front of real CPU expert servers."""

import random
import re

import httpx
import pytest
from helpers import FakeBackend, ServerThread

from eapo.core.config import DegradeConfig, ExpertBackend, GatewayConfig
from eapo.core.net import free_port
from expert_gateway.app import create_app
from expert_gateway.degrade import CONTENT_FREE, corrupt, degrade, withhold_result

SOLUTION = "45*3=135 23+135=158 \\boxed{158}"


def test_corrupt_shifts_only_the_boxed_result():
    wrong = corrupt(SOLUTION, random.Random(0))
    head, boxed = wrong.split("\\boxed{")
    assert head == "45*3=135 23+135=158 " and boxed.endswith("}")
    assert int(boxed[:-1]) != 158 and 1 <= abs(int(boxed[:-1]) - 158) <= 9
    # no box: the last integer of the text; no integer at all: nothing to corrupt
    assert corrupt("it is 7 or -12", random.Random(1)).startswith("it is 7 or ")
    assert corrupt("it is 7 or -12", random.Random(1)) != "it is 7 or -12"
    assert corrupt("no numbers here", random.Random(0)) is None


def test_withhold_result_keeps_the_steps_up_to_where_the_result_is_stated():
    assert withhold_result(SOLUTION) == "45*3=135 23+135="
    assert withhold_result("7*8=56 \\boxed{56}") == "7*8="  # one step: nothing but the question
    assert withhold_result("2-9=-7 -7*3=-21 \\boxed{-21}") == "2-9=-7 -7*3="  # signs are part of the value
    assert withhold_result("2*28=56 56-51=5 \\boxed{5}") == "2*28=56 56-51="  # =56 does not state 5
    assert withhold_result("x = 12.5, y = 12. \\boxed{ 12 }") == "x = 12.5, y ="  # 12.5 is not 12; 12. is
    assert withhold_result("8*2=16 16-3=13 13+3=16 \\boxed{16}") == "8*2="  # an intermediate showing it
    assert withhold_result("so \\boxed{12}, that is \\boxed{12}") == "so"  # not stated: cut at the first box
    assert withhold_result("no box, 12") is None and withhold_result("2-9=-7 \\boxed{}") is None
    withheld = DegradeConfig(mode="result_withheld")
    assert degrade(withheld, "m", SOLUTION, 0, "k") == "45*3=135 23+135="
    assert degrade(withheld, "m", "no box, 12", 0, "k") == "no box, 12"  # counted 'unchanged', passed on


def test_degrade_holds_its_rate_per_query_and_replays():
    cfg = DegradeConfig(mode="high_error", rate=0.3)
    outs = [degrade(cfg, "m", SOLUTION, 0, f"episode-{i}:0:q") for i in range(2000)]
    share = sum(o != SOLUTION for o in outs) / len(outs)
    assert 0.26 < share < 0.34, share
    assert outs == [degrade(cfg, "m", SOLUTION, 0, f"episode-{i}:0:q") for i in range(2000)]  # seeded
    assert outs != [degrade(cfg, "m", SOLUTION, 1, f"episode-{i}:0:q") for i in range(2000)]  # by the seed
    free = degrade(DegradeConfig(mode="content_free"), "m", SOLUTION, 0, "k")
    assert free in CONTENT_FREE and not re.search(r"\d", free)


def test_rate_out_of_range_is_refused():
    with pytest.raises(ValueError, match="less than or equal to 1"):
        DegradeConfig(mode="high_error", rate=1.5)


@pytest.mark.parametrize("mode", ["high_error", "content_free"])
def test_the_gateway_degrades_a_pools_consult_answers(mode, expert_servers, gateway):
    body = {"model": "expert", "queries": ["2+3*4", "7*8"], "max_tokens": 24, "episode_id": "e1"}
    honest = httpx.post(f"{gateway}/v1/consult", json=body, timeout=60).json()["results"]
    cfg = GatewayConfig(
        backends=[ExpertBackend(model="expert", url=u) for u in expert_servers],
        degrade={"expert": DegradeConfig(mode=mode, rate=1.0)},
    )
    with ServerThread(create_app(cfg), free_port()) as server:
        degraded = httpx.post(f"{server.url}/v1/consult", json=body, timeout=60).json()["results"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert len(degraded) == 2 and all(r["error"] is None for r in honest + degraded)
    for h, d in zip(honest, degraded, strict=True):
        assert d["answer"] != h["answer"]  # greedy experts: the same answer but for the degradation
        if mode == "content_free":
            assert d["answer"] in CONTENT_FREE
    counted = rf'eapo_gateway_degraded_total{{mode="{mode}",model="expert",outcome="degraded"}} (\d+)'
    assert int(float(re.search(counted, metrics).group(1))) >= 2


def test_degrade_draws_follow_the_querys_slot_in_its_block_not_its_place_in_the_request():
    """A client that sends only some of a block's queries (the rest withheld by the acceptance draw) names
    their slots: a query gets the degrade draw of its slot, as if its whole block had been sent."""
    with FakeBackend("7*8=56 \\boxed{56}") as pod:
        cfg = GatewayConfig(
            backends=[ExpertBackend(model="expert", url=pod.url)],
            degrade={"expert": DegradeConfig(mode="content_free", rate=0.5)},
        )
        with ServerThread(create_app(cfg), free_port()) as gw:

            def answers(queries: list[str], episode: str, slots: list[int] | None = None) -> list[str]:
                body = {"model": "expert", "queries": queries, "episode_id": episode, "slots": slots}
                return [
                    r["answer"] for r in httpx.post(f"{gw.url}/v1/consult", json=body, timeout=30).json()["results"]
                ]

            whole = [answers(["a", "b", "c"], f"e{i}")[1] for i in range(16)]
            assert whole == [answers(["b"], f"e{i}", [1])[0] for i in range(16)]
            assert whole != [answers(["b"], f"e{i}")[0] for i in range(16)]  # slot 0's draws differ
            bad = {"model": "expert", "queries": ["a", "b"], "slots": [1]}
            resp = httpx.post(f"{gw.url}/v1/consult", json=bad, timeout=30)
    assert resp.status_code == 422 and "1 slots for 2 queries" in resp.text
