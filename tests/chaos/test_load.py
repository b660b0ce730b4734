"""Load at 10x the default concurrency, bounded in time, loopback only: the gateway answers every request
with success or a documented backpressure answer (429/503 with Retry-After), and neither the gateway
nor the rollout's episode loop grows in memory once warm."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import numpy as np
import pytest
import yaml
from helpers import FakeBackend

from benchmarks.gateway import process
from benchmarks.rollout import episode_loop
from eapo.core.config import RolloutConfig
from eapo.core.net import free_port

pytestmark = pytest.mark.e2e
# The rollout's default: max_groups_in_flight x group_size episodes, each with up to K queries at once.
DEFAULT = RolloutConfig()
DEFAULT_QUERIES = DEFAULT.max_groups_in_flight * DEFAULT.group_size * DEFAULT.max_queries
ANSWERED, STALLED_S = 1200, 300  # the gateway load test runs until ANSWERED queries are answered


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def grows(samples: list[float]) -> float:
    """Relative growth of the last third of a series over its middle third (the first is warm-up)."""
    third = len(samples) // 3
    middle, last = np.mean(samples[third : 2 * third]), np.mean(samples[2 * third :])
    return float(last / middle - 1)


async def test_gateway_at_ten_times_default_concurrency_answers_and_stays_flat(tmp_path):
    """Clients keep 10x the rollout's default of queries in flight until ANSWERED queries are answered
    (about 16 s on an idle 2-core machine): a count, not a window, so a busy machine only takes longer;
    the bound fails a gateway that stalls."""
    concurrency = 10 * DEFAULT_QUERIES
    with FakeBackend("a", latency_ms=20) as a, FakeBackend("b", latency_ms=20) as b:
        port = free_port()
        cfg = {"gateway": {"port": port, "max_in_flight_per_backend": 64, "queue_size": 256, "queue_timeout_s": 2,
                           "backends": [{"model": "expert", "url": u} for u in (a.url, b.url)]}}  # fmt: skip
        (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "eapo.cli", "gateway", "--config", str(tmp_path / "gw.yaml")]
        with process(argv, f"http://127.0.0.1:{port}/readyz") as gateway:
            url = f"http://127.0.0.1:{port}/v1/consult"
            codes: dict[int | str, int] = {}
            rss: list[float] = []
            deadline = time.monotonic() + STALLED_S

            def done() -> bool:  # enough answers, and RSS samples for its trend
                assert time.monotonic() < deadline, f"{STALLED_S} s without {ANSWERED} answers: {codes}"
                return codes.get("answered", 0) >= ANSWERED and len(rss) >= 12

            async def client(http: httpx.AsyncClient) -> None:
                while not done():
                    r = await http.post(url, json={"model": "expert", "queries": ["2+3", "7*8", "9-1"]})
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code in (429, 503):
                        assert int(r.headers["Retry-After"]) >= 1
                    elif r.status_code == 200:  # partial success is normal: a query's error is the queue's
                        for result in r.json()["results"]:
                            kind = "answered" if result["error"] is None else "queue_full"
                            backpressure = ("all backends busy", "no backend slot freed")
                            assert kind == "answered" or any(b in result["error"] for b in backpressure), result
                            codes[kind] = codes.get(kind, 0) + 1

            async def sample() -> None:
                while not done():
                    rss.append(rss_mib(gateway.pid))
                    await asyncio.sleep(0.5)

            limits = httpx.Limits(max_connections=concurrency)
            async with httpx.AsyncClient(timeout=30, limits=limits) as http:
                await asyncio.gather(sample(), *(client(http) for _ in range(concurrency // 3)))
    print(f"\ngateway at {concurrency} concurrent queries: answers {codes}, RSS MiB {rss[0]:.0f} -> {rss[-1]:.0f}, "
          f"growth last/middle third {grows(rss):+.2%}")  # fmt: skip
    assert set(codes) <= {200, 429, 503, "answered", "queue_full"} and codes["answered"] >= ANSWERED, codes
    assert codes.get("queue_full", 0) > 0  # 480 queries against 2 x 64 slots + 256 queued: backpressure shown
    assert grows(rss) < 0.05, rss  # no growth trend once warm


async def test_rollout_episode_loop_at_ten_times_default_concurrency_stays_flat():
    import argparse
    import gc
    import tracemalloc

    args = argparse.Namespace(turn_ms=5.0, expert_ms=10.0)
    concurrency = 10 * DEFAULT.max_groups_in_flight * DEFAULT.group_size
    tracemalloc.start()
    traced = []
    for _ in range(9):  # rounds of the same load; memory measured after each
        await episode_loop(concurrency, concurrency * 3, args)
        gc.collect()
        traced.append(tracemalloc.get_traced_memory()[0] / 2**20)
    tracemalloc.stop()
    third = len(traced) // 3
    growth = (np.mean(traced[2 * third :]) - np.mean(traced[third : 2 * third])) * 2**20
    per_episode = growth / (third * concurrency * 3)
    print(f"\nepisode loop at {concurrency} episodes: traced MiB per round {[round(t, 3) for t in traced]}, "
          f"{per_episode:.1f} B per episode")  # fmt: skip
    # The Python heap holds a few hundred KiB at this load: judge growth per episode, not in percent.
    assert per_episode < 64, traced
