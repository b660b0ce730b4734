"""The DeepSpeed policy update: one optimizer step on a batch of trajectory groups.

ZeRO stage, gradient clipping and lr warm-up come from the config; fp32 on CPU, bf16 on GPU. Runs
as a single process (a private gloo group is set up) or under ``torchrun``/``deepspeed`` with ≥2 ranks.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import deepspeed
import torch

from eapo.config import LearnerConfig
from eapo.redis_server import free_port
from eapo.world.bootstrap import load_model
from learner.loss import dapo_loss, token_logprobs

log = logging.getLogger(__name__)


def init_distributed() -> None:
    """Join the launcher's process group, or make a one-process gloo group when run alone."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def deepspeed_config(cfg: LearnerConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": torch.cuda.is_available()},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Trainer:
    def __init__(self, cfg: LearnerConfig, model_path: Path):
        init_distributed()
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_model(model_path)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01)
        warmup = max(cfg.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
        )
        self.cfg = cfg

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def step(
        self,
        sequences: list[torch.Tensor],
        masks: list[torch.Tensor],
        behaviour: list[torch.Tensor],
        advantages: list[float],
    ) -> dict[str, float]:
        """One optimizer step on right-padded samples; returns loss and diagnostics."""
        device = self.engine.device
        width = max(len(s) for s in sequences)
        n = len(sequences)
        ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        old = torch.zeros((n, width), dtype=torch.float32)
        for i, (s, m, b) in enumerate(zip(sequences, masks, behaviour, strict=True)):
            ids[i, : len(s)], attn[i, : len(s)], mask[i, : len(s)], old[i, : len(s)] = s, 1, m, b
        ids, attn, mask, old = ids.to(device), attn.to(device), mask.to(device), old.to(device)
        self.engine.train()
        logits = self.engine(input_ids=ids, attention_mask=attn).logits
        logp = token_logprobs(logits, ids)
        adv = torch.tensor(advantages, dtype=torch.float32, device=device)
        loss, stats = dapo_loss(logp, old, adv, mask, self.cfg.clip_low, self.cfg.clip_high)
        with torch.no_grad():
            m = mask.float()
            probs = torch.softmax(logits.float()[:, :-1], dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
            stats["entropy"] = float((entropy * m[:, 1:]).sum() / m[:, 1:].sum().clamp(min=1))
            stats["logprob_gap"] = float(((logp - old).abs() * m).sum() / m.sum().clamp(min=1))
        self.engine.backward(loss)
        self.engine.step()
        stats["loss"] = float(loss.detach())
        stats["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        stats["lr"] = float(self.engine.get_lr()[0])
        return stats

    def save_checkpoint(self, root: Path, step: int, client_state: dict, keep: int = 2) -> None:
        """Model, optimizer and lr-scheduler state under ``root/step…``; DeepSpeed's ``latest`` file is
        rewritten only after the tag is complete, so a kill mid-save resumes from the previous one."""
        self.engine.save_checkpoint(str(root), tag=f"step{step:06d}", client_state=client_state)
        if torch.distributed.get_rank() == 0:
            for old in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("step"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, root: Path) -> dict | None:
        """Restore the newest complete checkpoint; returns its client state, or None if there is none."""
        if not (Path(root) / "latest").exists():
            return None
        path, client_state = self.engine.load_checkpoint(str(root))
        if path is None:
            raise RuntimeError(f"checkpoint in {root} could not be loaded")
        log.info("resumed from %s", path)
        return client_state

    def save_pretrained(self, path: Path) -> None:
        self.module.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
