"""Policy engines on the tiny world's policy: vLLM (its CPU build here, in-process ``AsyncLLM``) against our
batched CPU transformers engine and Hugging Face ``generate``.

    .venv/bin/python -m benchmarks.engines [--requests 32] [--tokens 64] [--syncs 6]

Throughput: ``--requests`` concurrent turns (one per episode in flight), each ``--tokens`` long, sampled at
temperature 1 from the training prompt; tokens/s = sampled tokens / wall time, after a warm-up turn.
vLLM and our engine take the requests concurrently, as the rollout sends them; HF ``generate`` takes
them one at a time (how a plain script samples), and as one batch (its best case). No stop token, so
every engine samples ``--tokens`` (vLLM: ``ignore_eos``).

Weight sync: a new version is published (written to storage, as the learner does), the engine loads it
(vLLM: ``collective_rpc`` into the worker extension), and a one-token turn is sampled under it; the time
from publish to that token, p50 and max over ``--syncs`` versions. Targets (issue #13): vLLM-CPU >= 5x
HF generate (both ways reported); weight sync p50 <= 1 s. The machine is shared: the 1-minute load
average at the end is in the config.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import print_table, write_result
from eapo.core.config import WorldConfig
from eapo.dev.world.bootstrap import bootstrap
from eapo.inference.model import load_model
from eapo.inference.sampling import SampleRequest
from proto import episode_format as fmt
from proto.weights import version_dir, write_version
from rollout_service.engine import TransformersEngine

VLLM_ARGS = {"dtype": "float32", "enforce_eager": True, "seed": 0}


def requests(tok, n: int, tokens: int) -> list[SampleRequest]:
    ids = tok.encode(fmt.render_prompt(tok, fmt.training_messages("12+34*5-6", 3)), add_special_tokens=False)
    return [SampleRequest(list(ids), tokens, temperature=1.0, seed=i) for i in range(n)]


async def engine_throughput(name: str, engine, n: int, tokens: int) -> dict:
    reqs = requests(engine.tokenizer, n, tokens)
    await engine.sample(reqs[0])  # warm-up
    t0 = time.perf_counter()
    results = await asyncio.gather(*(engine.sample(r) for r in reqs))
    wall = time.perf_counter() - t0
    sampled = sum(len(r.token_ids) for r, _ in results)
    return {"engine": name, "requests": n, "tokens": sampled, "seconds": wall, "tokens_per_s": sampled / wall}


@torch.inference_mode()
def hf_generate_throughput(path: Path, n: int, tokens: int, batched: bool) -> dict:
    model, tok = load_model(path)
    tok.padding_side = "left"
    prompts = [r.prompt_ids for r in requests(tok, n, tokens)]
    x = torch.tensor(prompts)  # one prompt n times: no padding needed
    kwargs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": tokens, "min_new_tokens": tokens,
              "pad_token_id": tok.pad_token_id}  # fmt: skip
    warm = kwargs | {"max_new_tokens": 4, "min_new_tokens": 4}
    model.generate(x[:1], attention_mask=torch.ones_like(x[:1]), **warm)
    t0 = time.perf_counter()
    for chunk in torch.split(x, n if batched else 1):
        out = model.generate(chunk, attention_mask=torch.ones_like(chunk), **kwargs)
    wall = time.perf_counter() - t0
    sampled = int((out.shape[1] - x.shape[1]) * n)
    name = "HF generate (one batch)" if batched else "HF generate (one at a time)"
    return {"engine": name, "requests": n, "tokens": sampled, "seconds": wall, "tokens_per_s": sampled / wall}


async def weight_sync(engine, root: Path, sources: list[Path], syncs: int) -> list[float]:
    """Seconds from publishing version v to the first token sampled under it, for v = 1..syncs."""
    times = []
    req = requests(engine.tokenizer, 1, 1)[0]
    for v in range(1, syncs + 1):
        source = sources[v % len(sources)]
        write_version(root, v, v, lambda tmp, s=source: shutil.copytree(s, tmp, dirs_exist_ok=True))
        t0 = time.perf_counter()
        await engine.load_version(v, version_dir(root, v))
        _, version = await engine.sample(req)
        times.append(time.perf_counter() - t0)
        assert version == v
    return times


class IgnoringEos:
    """The vllm module as the engine sees it, with ``ignore_eos`` in every ``SamplingParams``: vLLM stops
    at EOS even without stop ids, and the other engines here sample every requested token."""

    def __init__(self, vllm):
        self._vllm = vllm

    def __getattr__(self, name: str):
        return getattr(self._vllm, name)

    def SamplingParams(self, **kwargs):  # vllm's own name
        return self._vllm.SamplingParams(**kwargs, ignore_eos=True)


def moved_copy(source: Path, dest: Path, scale: float = 0.01, seed: int = 0) -> Path:
    """The model at ``source`` with every weight moved by ``scale`` standard normals, saved at ``dest``:
    a version whose log-probs differ from the first (the tests on real vLLM use it too)."""
    model, _ = load_model(source)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    shutil.copytree(source, dest, dirs_exist_ok=True)
    model.save_pretrained(dest)
    return dest


async def main(args: argparse.Namespace) -> None:
    from rollout_service import vllm_engine

    world = WorldConfig()
    bootstrap(world)  # cached after the first build
    policy = world.dir / "policy"
    scratch = Path(tempfile.mkdtemp(prefix="eapo-engines-"))
    sources = [policy, moved_copy(policy, scratch / "moved")]
    rows, syncs = [], {}
    try:
        for batched in (False, True):
            rows.append(hf_generate_throughput(policy, args.requests, args.tokens, batched))
            print(f"  {rows[-1]['engine']}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)

        cpu = TransformersEngine(policy, version=0, max_batch=args.requests)
        rows.append(await engine_throughput("ours: batched CPU engine", cpu, args.requests, args.tokens))
        print(f"  {rows[-1]['engine']}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        syncs["ours: batched CPU engine"] = await weight_sync(cpu, scratch / "cpu-weights", sources, args.syncs)
        await cpu.close()

        # every vLLM request samples its full length, as the others do (no stop token, EOS ignored)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        t0 = time.perf_counter()
        engine = vllm_engine.VLLMEngine(policy, 0, VLLM_ARGS)
        start_s = time.perf_counter() - t0
        engine._vllm = IgnoringEos(engine._vllm)
        rows.append(await engine_throughput("vLLM (AsyncLLM, CPU build)", engine, args.requests, args.tokens))
        print(f"  {rows[-1]['engine']}: {rows[-1]['tokens_per_s']:.0f} tok/s (started in {start_s:.0f} s)", flush=True)
        syncs["vLLM (AsyncLLM, CPU build)"] = await weight_sync(engine, scratch / "vllm-weights", sources, args.syncs)
        await engine.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    hf, hf_batched = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    for r in rows:
        r["vs_hf_generate"] = r["tokens_per_s"] / hf
        s = syncs.get(r["engine"])
        r["sync_p50_s"], r["sync_max_s"] = (float(np.median(s)), max(s)) if s else (None, None)
    print(f"\ntiny world policy, {args.requests} concurrent turns x {args.tokens} tokens; "
          f"weight sync over {args.syncs} versions\n")  # fmt: skip
    print_table(rows, ["engine", "requests", "tokens", "seconds", "tokens_per_s", "vs_hf_generate", "sync_p50_s",
                       "sync_max_s"])  # fmt: skip
    vllm, ours = rows[3], rows[2]
    summary = {
        "vllm_tokens_per_s": vllm["tokens_per_s"],
        "ours_tokens_per_s": ours["tokens_per_s"],
        "hf_generate_tokens_per_s": hf,
        "hf_generate_batched_tokens_per_s": hf_batched,
        "vllm_vs_hf_generate": vllm["vs_hf_generate"],
        "vllm_vs_hf_generate_batched": vllm["tokens_per_s"] / hf_batched,
        "vllm_vs_ours": vllm["tokens_per_s"] / ours["tokens_per_s"],
        "vllm_sync_p50_s": vllm["sync_p50_s"],
        "vllm_sync_max_s": vllm["sync_max_s"],
        "vllm_start_s": start_s,
    }
    targets = {
        "vllm_ge_5x_hf_generate": summary["vllm_vs_hf_generate"] >= 5,
        "vllm_ge_5x_hf_generate_batched": summary["vllm_vs_hf_generate_batched"] >= 5,
        "vllm_sync_p50_le_1s": summary["vllm_sync_p50_s"] <= 1.0,
    }
    print(f"\nvLLM vs HF generate {summary['vllm_vs_hf_generate']:.1f}x one at a time, "
          f"{summary['vllm_vs_hf_generate_batched']:.1f}x batched (target >= 5), vs ours "
          f"{summary['vllm_vs_ours']:.1f}x; vLLM weight sync p50 {summary['vllm_sync_p50_s']:.2f} s "
          "(target <= 1)")  # fmt: skip
    config = vars(args) | {"vllm_args": VLLM_ARGS, "load_average_1m_at_end": os.getloadavg()[0]}
    write_result("engines", config, {"rows": rows, "sync_s": syncs}, summary, targets)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from re-running this
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=6)
    asyncio.run(main(parser.parse_args()))
