"""Rollout throughput: how close the episode loop gets to its ideal bound, and what batching buys.

    .venv/bin/python -m benchmarks.rollout [--concurrency 64 512 2048] [--episodes-per-slot 30]

Part 1, the episode loop alone (one process): a scripted policy engine (each turn takes
``--turn-ms``; turn 1 asks K=2 queries, turn 2 answers) and fake experts (``--expert-ms`` per consult
block) run ``run_episode`` — parsing, acceptance draws, injection, masks — with C episodes in flight,
closed loop, and every finished group of G episodes is encoded as it would be for the stream. Ideal:
C / (2·turn + P(some query asked)·expert) episodes/s: at p = 0.5 a block's two queries are both withheld,
and no expert is called, one time in four. The C/G group workers start spread over one ideal episode time, as
a running service's episodes are: started together, constant latencies would keep them in lock-step
waves that a real engine's varying latencies never produce. ``of_ideal`` is the steady-state rate
(groups finished between the 10th and the 90th percentile of finish times); ``of_ideal_whole_run``
also counts the ramp-up and the drain. Also CPU per episode, the event loop's lag (a 5 ms ticker's
overshoot, p99) and the resident memory per in-flight episode. The process runs as ``eapo rollout``
does: uvloop, and the collector tuned (``eapo.core.gc_tuning``). Target: >= 90% of ideal at 512.

Part 2, the CPU transformers engine on the tiny world's policy: tokens/s for 32 concurrent generation
requests, batched into shared forward passes vs one at a time. Target: >= 5x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time

import numpy as np
import uvloop

from benchmarks.common import print_table, write_result
from eapo.core.config import RolloutConfig, WorldConfig
from eapo.core.gc_tuning import tune_gc
from eapo.dev.world.bootstrap import bootstrap
from eapo.dev.world.sft import build_tokenizer
from eapo.inference.sampling import SampleRequest, SampleResult
from proto import AnnealState, ConsultResult, PromptTask, TrajectoryGroup, encode
from proto import episode_format as fmt
from rollout_service.engine import TransformersEngine
from rollout_service.episode import run_episode

ANNEAL = AnnealState(step=0, acceptance=0.5, budget=4, penalty=0.0)
GROUP = 4


class ScriptedEngine:
    """Answers like a policy that consults once and then concludes, in a fixed time per turn."""

    def __init__(self, turn_s: float):
        self.tokenizer = build_tokenizer()
        self.turn_s = turn_s
        expert_close = self.tokenizer.convert_tokens_to_ids(fmt.EXPERT_CLOSE)
        self._is_second = lambda ids: expert_close in ids
        self._consult = self.tokenizer.encode("17*23 is 391. " + fmt.consult_block(["17*23", "391-5"]))
        self._answer = [*self.tokenizer.encode("so \\boxed{386}"), self.tokenizer.eos_token_id]

    version = 0

    async def sample(self, request: SampleRequest) -> tuple[SampleResult, int]:
        await asyncio.sleep(self.turn_s)
        second = self._is_second(request.prompt_ids)
        ids, stop = (self._answer, None) if second else (self._consult, fmt.CONSULT_CLOSE)  # a turn ends on the tag
        return SampleResult(list(ids), [-0.5] * len(ids), "stop", stop), 0

    async def load_version(self, version, path) -> None:  # the benchmark never publishes weights
        raise NotImplementedError

    async def close(self) -> None:
        pass


class FakeExperts:
    """Answers after a fixed latency; every answer is a different text, as sampled answers are (so the
    episode's tokenizer cache gains nothing it would not gain in a real run)."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self.answered = 0

    async def consult(self, queries: list[str], episode_id: str, slots: list[int] | None = None) -> list[ConsultResult]:
        await asyncio.sleep(self.latency_s)
        self.answered += len(queries)
        return [ConsultResult(index=i, answer=str(self.answered + i), latency_ms=self.latency_s * 1000)
                for i in range(len(queries))]  # fmt: skip


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def ticker(lags: list[float], peak_rss: list[float], stop: asyncio.Event, period_s: float = 0.005) -> None:
    """The event loop's lag (how late a 5 ms sleep wakes up) and the peak resident memory."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(period_s)
        lags.append((time.perf_counter() - t0 - period_s) * 1000)
        peak_rss[0] = max(peak_rss[0], rss_mib())


async def episode_loop(concurrency: int, episodes: int, args: argparse.Namespace) -> dict:
    engine, experts = ScriptedEngine(args.turn_ms / 1000), FakeExperts(args.expert_ms / 1000)
    cfg = RolloutConfig(max_new_tokens=64, max_context=512, max_queries=3)
    lags: list[float] = []
    stop = asyncio.Event()
    base = rss_mib()
    peak = [base]
    groups = iter(range(episodes // GROUP))
    sizes: list[int] = []
    finished: list[float] = []
    workers = concurrency // GROUP
    # one episode at the ideal pace: a block whose K = 2 queries the draw all withholds calls no expert
    asked = 1 - (1 - ANNEAL.acceptance) ** 2
    period = (2 * args.turn_ms + asked * args.expert_ms) / 1000

    async def worker(i: int) -> None:  # as the service runs: groups in flight, each G concurrent episodes
        await asyncio.sleep(i * period / workers)
        for g in groups:
            task = PromptTask(prompt_id=f"p{g}", problem=f"{g}*23-5", answer=str(g * 23 - 5))  # a prompt per group
            samples = await asyncio.gather(*(run_episode(engine, experts, task, ANNEAL, cfg, i) for i in range(GROUP)))
            tg = TrajectoryGroup(group_id=f"g{g}", prompt=task, anneal=ANNEAL, samples=list(samples),
                                 rollout_replica="bench", created_at=time.time())  # fmt: skip
            sizes.append(len(encode(tg)))
            finished.append(time.perf_counter())

    tick = asyncio.create_task(ticker(lags, peak, stop))
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(workers)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    await tick
    ideal = concurrency / period
    done = GROUP * len(sizes)
    first, last = len(finished) // 10, len(finished) * 9 // 10
    steady = GROUP * (last - first) / (finished[last] - finished[first]) if last > first else done / wall
    return {
        "concurrency": concurrency,
        "episodes": done,
        "episodes_per_s": steady,
        "ideal_per_s": ideal,
        "of_ideal": steady / ideal,
        "of_ideal_whole_run": done / wall / ideal,
        "cpu_us_per_episode": cpu / done * 1e6,
        "loop_lag_p99_ms": float(np.percentile(lags, 99)),
        "kib_per_episode": max(peak[0] - base, 0.0) * 1024 / concurrency,
        "payload_kib_per_group": float(np.mean(sizes)) / 1024,
    }


async def engine_throughput(args: argparse.Namespace, world: WorldConfig) -> list[dict]:
    rows = []
    for batched in (False, True):
        engine = TransformersEngine(world.dir / "policy", version=0, max_batch=32 if batched else 1)
        prompt = engine.tokenizer.encode(fmt.eval_prompt("12+34*5-6"))
        requests = [
            SampleRequest(prompt_ids=list(prompt), max_new_tokens=args.engine_tokens, temperature=1.0, seed=i)
            for i in range(32)
        ]
        await engine.sample(requests[0])  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(engine.sample(r) for r in requests))
        wall = time.perf_counter() - t0
        await engine.close()
        tokens = sum(len(r.token_ids) for r, _ in results)
        rows.append({"engine": "batched (max_batch 32)" if batched else "one at a time", "requests": 32,
                     "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall})  # fmt: skip
    return rows


async def main(args: argparse.Namespace) -> None:
    loop_rows = []
    for c in args.concurrency:
        loop_rows.append(await episode_loop(c, max(c * args.episodes_per_slot, GROUP), args))
        print(f"  episodes c={c}: {loop_rows[-1]['episodes_per_s']:.0f}/s", flush=True)
    world = WorldConfig()
    bootstrap(world)  # cached after the first build
    engine_rows = await engine_throughput(args, world)
    speedup = engine_rows[1]["tokens_per_s"] / engine_rows[0]["tokens_per_s"]

    print(f"\nepisode loop: scripted policy {args.turn_ms:.0f} ms/turn, experts {args.expert_ms:.0f} ms, G={GROUP}\n")
    print_table(loop_rows, ["concurrency", "episodes", "episodes_per_s", "ideal_per_s", "of_ideal",
                            "of_ideal_whole_run", "cpu_us_per_episode", "loop_lag_p99_ms", "kib_per_episode",
                            "payload_kib_per_group"])  # fmt: skip
    print(f"\nCPU transformers engine, tiny policy, 32 concurrent requests x {args.engine_tokens} tokens\n")
    print_table(engine_rows, ["engine", "requests", "tokens", "seconds", "tokens_per_s"])
    at512 = next((r for r in loop_rows if r["concurrency"] == 512), None)
    print(f"\nbatching speed-up {speedup:.1f}x (target >= 5)" + (
        f"; episode loop at 512: {at512['of_ideal']:.1%} of ideal (target >= 90%)" if at512 else ""))  # fmt: skip
    write_result(
        "rollout",
        vars(args) | {"group_size": GROUP, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        {"episode_loop": loop_rows, "engine": engine_rows},
        {"of_ideal_at_512": at512 and at512["of_ideal"], "batching_speedup": speedup},
        {"of_ideal_at_512_ge_0.9": bool(at512 and at512["of_ideal"] >= 0.9), "batching_speedup_ge_5": speedup >= 5},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument(
        "--episodes-per-slot", type=int, default=30, help="episodes run = concurrency x this (steady state, not ramp)"
    )
    parser.add_argument("--turn-ms", type=float, default=20.0)
    parser.add_argument("--expert-ms", type=float, default=50.0)
    parser.add_argument("--engine-tokens", type=int, default=48)
    args = parser.parse_args()
    tune_gc()
    uvloop.run(main(args))
