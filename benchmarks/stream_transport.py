"""Stream transport: trajectory groups/s and bytes/token through our codec + Redis Streams transport,
against raw XADD/XREADGROUP/XACK of the same bytes, in the same run on the same private Redis.

    python -m benchmarks.stream_transport [--groups 200] [--samples 8] [--tokens 4096]

Ours: encode → StreamProducer.send (with its backlog check) → StreamConsumer.read (with its reclaim
check) → decode+validate → XACK. Raw: XADD of the pre-encoded bytes → XREADGROUP → XACK.
Targets: ours ≤ 1.5× raw time per group, ≤ 9.5 bytes per token.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from benchmarks.common import print_table, write_result
from eapo.dev.redis_server import RedisServer
from proto import AnnealState, PromptTask, Trajectory, TrajectoryGroup, TurnRecord, encode
from proto.streams import StreamConsumer, StreamProducer, ensure_group


def make_group(i: int, samples: int, tokens: int, rng: np.random.Generator) -> TrajectoryGroup:
    trajs = []
    for s in range(samples):
        mask = np.ones(tokens, bool)
        mask[:256] = False
        mask[2000:2300] = False  # an injected expert answer
        trajs.append(
            Trajectory(
                sample_index=s,
                token_ids=rng.integers(0, 151_000, tokens, dtype=np.int32),
                loss_mask=mask,
                behaviour_logprobs=np.where(mask, -rng.random(tokens), 0).astype(np.float32),
                prompt_len=256,
                turns=[
                    TurnRecord(start=256, end=2000, policy_version=1, finish="consult"),
                    TurnRecord(start=2300, end=tokens, policy_version=1, finish="eos"),
                ],
                score=1.0,
                finish="answer",
                seed=s,
            )
        )
    return TrajectoryGroup(
        group_id=f"g{i}",
        prompt=PromptTask(prompt_id=f"p{i}", problem="x", answer="1"),
        anneal=AnnealState(step=1, acceptance=0.5, budget=4, penalty=0.0),
        samples=trajs,
        rollout_replica="bench",
        created_at=0.0,
    )


async def run_ours(client: aioredis.Redis, groups: list[TrajectoryGroup], batch: int) -> float:
    stream = "bench:ours"
    consumer = StreamConsumer(client, stream, "g", "c", TrajectoryGroup)
    await consumer.ensure_group()
    producer = StreamProducer(client, stream, ["g"], high_water=1 << 30)
    t0 = time.perf_counter()
    for start in range(0, len(groups), batch):
        for g in groups[start : start + batch]:
            await producer.send(g)
        got = 0
        while got < min(batch, len(groups) - start):
            entries = await consumer.read(count=batch, block_ms=1000)
            await consumer.ack([e.id for e in entries])
            got += len(entries)
    return time.perf_counter() - t0


async def run_raw(client: aioredis.Redis, payloads: list[bytes], batch: int) -> float:
    stream = "bench:raw"
    await ensure_group(client, stream, "g")
    t0 = time.perf_counter()
    for start in range(0, len(payloads), batch):
        for p in payloads[start : start + batch]:
            await client.xadd(stream, {b"d": p})
        got = 0
        while got < min(batch, len(payloads) - start):
            reply = await client.xreadgroup("g", "c", {stream: ">"}, count=batch, block=1000)
            ids = [i for _, entries in reply for i, _ in entries]
            await client.xack(stream, "g", *ids)
            got += len(ids)
    return time.perf_counter() - t0


async def main(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    groups = [make_group(i, args.samples, args.tokens, rng) for i in range(args.groups)]
    payloads = [encode(g) for g in groups]
    # The input corpus is scaffolding, not part of the system: keep the cyclic GC from rescanning it
    # (a real producer or learner holds a handful of groups, not hundreds).
    gc.freeze()
    tokens_per_group = args.samples * args.tokens
    bytes_per_token = float(np.mean([len(p) for p in payloads])) / tokens_per_group
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        client = aioredis.Redis.from_url(server.url)
        info = await client.info("server")
        rows, raw = [], {"ours_s": [], "raw_s": []}
        for i in range(args.repeats):  # alternate the order to share any drift of the machine fairly
            for path in ("raw", "ours") if i % 2 == 0 else ("ours", "raw"):
                if path == "raw":
                    raw["raw_s"].append(await run_raw(client, payloads, args.batch))
                else:
                    raw["ours_s"].append(await run_ours(client, groups, args.batch))
                await client.delete(f"bench:{path}")
        await client.aclose()
    ours, base = float(np.median(raw["ours_s"])), float(np.median(raw["raw_s"]))
    for name, secs in (("raw XADD/XREADGROUP/XACK", base), ("eapo codec + transport", ours)):
        rows.append(
            {
                "path": name,
                "groups/s": args.groups / secs,
                "MB/s": args.groups * len(payloads[0]) / secs / 1e6,
                "ms/group": 1000 * secs / args.groups,
            }
        )
    print(
        f"{args.groups} groups of {args.samples} samples x {args.tokens} tokens, redis {info['redis_version']}, "
        f"median of {args.repeats}\n"
    )
    print_table(rows, ["path", "groups/s", "MB/s", "ms/group"])
    ratio = ours / base
    print(f"\nours/raw time ratio {ratio:.2f} (target <= 1.5); bytes/token {bytes_per_token:.3f} (target <= 9.5)")
    write_result(
        "stream_transport",
        vars(args) | {"redis_version": info["redis_version"]},
        raw | {"rows": rows},
        {
            "groups_per_s_ours": args.groups / ours,
            "groups_per_s_raw": args.groups / base,
            "time_ratio_ours_over_raw": ratio,
            "bytes_per_token": bytes_per_token,
        },
        {"time_ratio_le_1.5": ratio <= 1.5, "bytes_per_token_le_9.5": bytes_per_token <= 9.5},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16, help="groups produced before the consumer drains them")
    parser.add_argument("--repeats", type=int, default=7)
    asyncio.run(main(parser.parse_args()))
