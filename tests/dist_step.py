"""Run under torchrun by test_learner_ranks: for each setting ``STAGE:MICRO_TOKENS:KL_COEF`` a fresh
learner takes one step on a fixed batch; rank 0 writes each loss and the updated parameters, so runs
with different rank counts, ZeRO stages or packings can be compared. Several settings share one launch
(process start and DeepSpeed's import are most of a run's time)."""

import json
import sys
from pathlib import Path

import torch

from eapo.core.config import LearnerConfig
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


def step(world_dir: str, stage: int, micro_tokens: int, kl_coef: float) -> dict:
    cfg = LearnerConfig(
        seed=0, zero_stage=stage, micro_batch_tokens=micro_tokens, lr=1e-3, warmup_steps=1, kl_coef=kl_coef
    )
    trainer = Trainer(cfg, Path(world_dir) / "policy")
    stats = trainer.step(fixed_batch(len(trainer.tokenizer)))
    params = torch.cat([p.detach().double().flatten() for p in trainer.module.parameters()])
    return {"loss": stats["loss"], "kl": stats.get("kl"), "tokens": stats["policy_tokens"], "params": params.tolist()}


def main() -> None:
    world_dir, out, settings = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    results = {}
    for setting in settings:
        stage, micro_tokens, kl_coef = setting.split(":")
        results[setting] = step(world_dir, int(stage), int(micro_tokens), float(kl_coef))
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps({"world": torch.distributed.get_world_size(), "results": results}))


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():  # a gloo group left to exit handlers can abort the process
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
