"""The CPU sampler under the rollout's traffic: many episodes, each asking for one turn after another.

    .venv/bin/python -m benchmarks.batching [--clients 40] [--turns 12] [--rounds 3]

Closed loop, one process, torch on one thread (as beside the other services): ``--clients`` concurrent
callers each ask the shipped world's model (the policy, then the solver expert) for ``--turns`` turns in a
row, of 8–64 new tokens on prompts of varying length (stop at EOS or ``</consult>``), pausing up to 10 ms
between turns as an episode waits on its experts. Prints tokens/s and the p50/p95 turn latency per model
and round. It measures ``Batcher`` through its public API only, so the same script runs on an older
commit's sampler (how the continuous batcher was compared with the batch-at-a-time one it replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, write_result
from eapo.inference.model import load_model
from eapo.inference.sampling import Batcher, SampleRequest
from proto import episode_format as fmt

WORLD = Path("docs/experiment-report/world")
PROBLEMS = ["2+3*4", "7*8-9", "12+34*5-6", "9-8", "45*3+23", "88-7*6"]


async def closed_loop(model: torch.nn.Module, tok, clients: int, turns: int, seed: int) -> dict:
    batcher = Batcher(model, tok.pad_token_id, max_batch=64, version=0, tokenizer=tok)
    rng = random.Random(seed)
    latencies: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for turn in range(turns):
            prompt = tok.encode(fmt.training_prompt(PROBLEMS[(c + turn) % len(PROBLEMS)]))
            prompt += [tok.eos_token_id + 4] * rng.randint(0, 60)  # earlier turns of the episode
            request = SampleRequest(
                prompt,
                rng.randint(8, 64),
                frozenset({tok.eos_token_id}),
                stop_strings=("</consult>",),
                seed=seed * 10_000 + c * 100 + turn,
            )
            t0 = time.perf_counter()
            result, _ = await batcher.sample(request)
            latencies.append(time.perf_counter() - t0)
            tokens += len(result.token_ids)
            await asyncio.sleep(rng.random() * 0.01)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        await batcher.close()
    seconds = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
    }


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        model, tok = load_model(WORLD / name)
        for r in range(args.rounds):
            measured = asyncio.run(closed_loop(model, tok, args.clients, args.turns, r))
            rows.append({"model": name, "round": r, **measured})
    print_table(rows, ["model", "round", "tokens", "seconds", "tokens_per_s", "latency_p50_s", "latency_p95_s"])
    summary = {
        f"{name}_tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in rows if r["model"] == name]))
        for name in args.models
    }
    write_result(args.name, vars(args), {"rounds": rows}, summary, {})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["policy", "expert"])
    parser.add_argument("--name", default="batching", help="the result's file name under benchmarks/results")
    main(parser.parse_args())
