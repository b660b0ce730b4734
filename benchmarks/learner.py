"""Learner step throughput: our DeepSpeed step against a plain PyTorch AdamW loop on the same model,
batch and loss, in one run; and weight publish + announce latency.

    python -m benchmarks.learner [--steps 20] [--samples 16] [--tokens 256]

Target: DeepSpeed step overhead ≤ 15% over the plain loop (tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import torch

from benchmarks.common import print_table, write_result
from eapo.core.config import LearnerConfig, WorldConfig
from eapo.dev.redis_server import RedisServer
from eapo.dev.world.sft import build_tokenizer, new_model
from learner.loss import dapo_loss, token_logprobs
from learner.trainer import Trainer, TrainSample
from proto import encode
from proto.weights import write_version


def batch(samples: int, tokens: int, vocab: int) -> list[TrainSample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(samples):
        mask = torch.arange(tokens) >= tokens // 4
        out.append(
            TrainSample(
                ids=torch.randint(7, vocab, (tokens,), generator=g),
                mask=mask,
                behaviour=torch.where(mask, torch.full((tokens,), -4.0), 0.0),
                advantage=1.0 if i % 2 else -1.0,
            )
        )
    return out


def plain_step(model, opt, samples: list[TrainSample], cfg: LearnerConfig) -> None:
    ids = torch.stack([s.ids for s in samples])
    mask = torch.stack([s.mask for s in samples])
    old = torch.stack([s.behaviour for s in samples])
    adv = torch.tensor([s.advantage for s in samples])
    logp = token_logprobs(model(input_ids=ids).logits, ids)
    loss, _ = dapo_loss(logp, old, adv, mask, cfg.clip_low, cfg.clip_high, cfg.importance, cfg.behaviour_weight_cap)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


def timed(fn, steps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


async def publish_latency(trainer: Trainer, root: Path, repeats: int) -> list[float]:
    with RedisServer(root / "redis") as server:
        client = aioredis.Redis.from_url(server.url)
        out = []
        for v in range(repeats):
            t0 = time.perf_counter()
            manifest = await asyncio.to_thread(write_version, root / "weights", v, v, trainer.save_pretrained)
            async with client.pipeline(transaction=True) as pipe:
                pipe.set("bench:weights", encode(manifest))
                pipe.publish("bench:announce", str(v))
                await pipe.execute()
            out.append(time.perf_counter() - t0)
        await client.aclose()
    return out


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    world = WorldConfig()
    tok = build_tokenizer()
    cfg = LearnerConfig(zero_stage=args.zero_stage, micro_batch_tokens=1 << 30, lr=1e-5, warmup_steps=1)
    samples = batch(args.samples, args.tokens, len(tok))
    tokens = args.samples * args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = new_model(
            len(tok), world.policy.hidden, world.policy.layers, max(world.max_positions, args.tokens), tok
        )
        model.save_pretrained(root / "policy")
        tok.save_pretrained(root / "policy")
        trainer = Trainer(cfg, root / "policy")
        plain = new_model(
            len(tok), world.policy.hidden, world.policy.layers, max(world.max_positions, args.tokens), tok
        )
        plain.load_state_dict(model.state_dict())
        plain.train()
        opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, weight_decay=0.01)
        ours, base = [], []
        for _ in range(args.rounds):  # alternate so drift of the machine is shared
            base += timed(lambda: plain_step(plain, opt, samples, cfg), args.steps)
            ours += timed(lambda: trainer.step(samples), args.steps)
        publish = asyncio.run(publish_latency(trainer, root, args.publish_repeats))
    t_ours, t_base = statistics.median(ours), statistics.median(base)
    overhead = t_ours / t_base - 1
    rows = [
        {"path": "plain PyTorch AdamW", "ms/step": 1000 * t_base, "tokens/s": tokens / t_base},
        {
            "path": f"eapo Trainer (DeepSpeed ZeRO-{args.zero_stage})",
            "ms/step": 1000 * t_ours,
            "tokens/s": tokens / t_ours,
        },
    ]
    params = sum(p.numel() for p in plain.parameters())
    print(
        f"tiny policy ({params / 1e3:.0f}k params), batch {args.samples} x {args.tokens} tokens, "
        f"median of {len(ours)} steps\n"
    )
    print_table(rows, ["path", "ms/step", "tokens/s"])
    p50 = statistics.median(publish)
    print(f"\noverhead {100 * overhead:+.1f}% (target <= +15%); publish + announce p50 {1000 * p50:.1f} ms")
    write_result(
        "learner",
        vars(args) | {"params": params},
        {"ours_s": ours, "plain_s": base, "publish_s": publish, "rows": rows},
        {
            "tokens_per_s_ours": tokens / t_ours,
            "tokens_per_s_plain": tokens / t_base,
            "overhead": overhead,
            "publish_announce_p50_ms": 1000 * p50,
            "publish_announce_max_ms": 1000 * max(publish),
        },
        {"overhead_le_15pct": overhead <= 0.15},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--publish-repeats", type=int, default=10)
    main(parser.parse_args())
