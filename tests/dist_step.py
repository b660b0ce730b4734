"""Run under torchrun by test_learner_ranks: for each setting (``key=value,…``: LearnerConfig fields, plus
``steps=N`` to take the batch as N steps on consecutive shares instead of one, ``on_policy=1`` to
make the behaviour log-probs the starting policy's own, and ``unsampled=half`` to take them from every
other sample, as a distilled sample has none) a fresh learner steps on a fixed batch; rank 0
writes each loss and the updated parameters, so runs with different rank counts, ZeRO stages, packings
or update schedules can be compared. Several settings share one launch
(process start and DeepSpeed's import are most of a run's time)."""

import json
import sys
from pathlib import Path

import torch

from eapo.core.config import LearnerConfig
from learner.loss import token_logprobs
from learner.trainer import Trainer, TrainSample


def fixed_batch(vocab: int) -> list[TrainSample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        n = int(torch.randint(20, 60, (1,), generator=g))
        mask = torch.arange(n) >= 8
        mask[n // 2 : n // 2 + 5] = False  # an injected expert answer inside the sequence
        behaviour = torch.where(mask, -4.0 - torch.rand(n, generator=g), torch.zeros(n))
        ids = torch.randint(7, vocab, (n,), generator=g)
        samples.append(TrainSample(ids=ids, mask=mask, behaviour=behaviour, advantage=1.0 if i % 2 else -1.0))
    return samples


def on_policy(trainer: Trainer, samples: list[TrainSample]) -> None:
    """Behaviour log-probs := the starting policy's own, so π_prox = π_behaviour at the step's start."""
    with torch.no_grad():
        for s in samples:
            logits = trainer.module(input_ids=s.ids[None].to(trainer.engine.device)).logits
            s.behaviour = torch.where(s.mask, token_logprobs(logits, s.ids[None])[0].float().cpu(), 0.0)


def step(world_dir: str, setting: str) -> dict:
    options = dict(kv.split("=") for kv in setting.split(","))
    steps, behaviour_on_policy = int(options.pop("steps", 1)), options.pop("on_policy", "0") == "1"
    unsampled = options.pop("unsampled", "none") == "half"
    cfg = LearnerConfig(**{"seed": 0, "lr": 1e-3, "warmup_steps": 1, **options})
    trainer = Trainer(cfg, Path(world_dir) / "policy")
    samples = fixed_batch(len(trainer.tokenizer))
    if behaviour_on_policy:
        on_policy(trainer, samples)
    for s in samples[::2] if unsampled else []:
        s.behaviour = None
    size = len(samples) // steps
    stats = [trainer.step(samples[i : i + size]) for i in range(0, len(samples), size)]
    params = torch.cat([p.detach().double().flatten() for p in trainer.module.parameters()])
    last = stats[-1]
    return {
        "loss": last["loss"],
        "kl": last.get("kl"),
        "tokens": last["policy_tokens"],
        "updates": sum(s["updates"] for s in stats),
        "clipped": last["clip_frac_low"] + last["clip_frac_high"],  # the mean share over its updates
        "params": params.tolist(),
    }


def main() -> None:
    world_dir, out, settings = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    results = {}
    for setting in settings:
        results[setting] = step(world_dir, setting)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps({"world": torch.distributed.get_world_size(), "results": results}))


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():  # a gloo group left to exit handlers can abort the process
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
