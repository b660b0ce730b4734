"""The DeepSpeed policy update: a learner step on a batch of trajectory groups, one optimizer update
by default, several with ``mini_batches``/``ppo_epochs``.

ZeRO stage, gradient clipping and lr warm-up come from the config; fp32 on CPU, bf16 on GPU. Runs
as a single process (a private gloo group is set up) or under ``torchrun``/``deepspeed`` with ≥2 ranks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from eapo.core.config import LearnerConfig
from eapo.core.files import write_atomic
from eapo.core.net import free_port
from eapo.inference.model import load_model
from learner.checkpoints import LATEST, PREFIX, checkpoint_tag
from learner.loss import dapo_loss, kl_penalty, token_logprobs
from learner.ops import build_deepspeed_ops
from proto import Trajectory

log = logging.getLogger(__name__)


def init_distributed() -> None:
    """Join the launcher's process group, or make a one-process gloo group when run alone."""
    build_deepspeed_ops()  # before DeepSpeed loads it on its own, where a stale lock would hang it
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
        # We own the accumulation boundary: a step has as many token-packed micro-batches as it needs,
        # backward() only accumulates locally and step() reduces across ranks and updates.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": torch.cuda.is_available()},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@dataclass
class TrainSample:
    ids: torch.Tensor  # int64 [T]
    mask: torch.Tensor  # bool [T]: 1 on policy-sampled tokens
    # float32 [T]: behaviour log-probs (0 off the mask); None: not sampled in this context (learner.distill),
    # trained on-policy, at the learner's own log-probs at the step's start
    behaviour: torch.Tensor | None
    advantage: float
    proximal: torch.Tensor | None = None  # float32 [T]: log-probs before the step's first update

    @classmethod
    def of(cls, trajectory: Trajectory, advantage: float) -> TrainSample:
        """Copies the arrays: a received message's are read-only views of its bytes."""
        return cls(
            ids=torch.from_numpy(trajectory.token_ids.astype("int64")),
            mask=torch.from_numpy(trajectory.loss_mask.copy()),
            behaviour=torch.from_numpy(trajectory.behaviour_logprobs.copy()),
            advantage=advantage,
        )


def pack_by_tokens(samples: list[TrainSample], max_tokens: int) -> list[list[TrainSample]]:
    """Longest first, greedily, so a micro-batch's padded size (rows × longest) stays ≤ ``max_tokens``
    (a single longer sample gets a micro-batch of its own)."""
    batches: list[list[TrainSample]] = []
    for s in sorted(samples, key=lambda s: len(s.ids), reverse=True):
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0].ids) <= max_tokens:
            batches[-1].append(s)
        else:
            batches.append([s])
    return batches


def split_groups(samples: list[TrainSample], group_sizes: list[int], n: int) -> list[list[TrainSample]]:
    """``samples`` (group after group) in ``min(n, groups)`` consecutive shares of whole groups, as equal
    in groups as can be: every update sees whole groups, whose advantages sum to zero (but for the
    distilled samples ``learner.internalize`` adds to a group, all credited positively)."""
    if sum(group_sizes) != len(samples):
        raise ValueError(f"group sizes {group_sizes} do not add up to the {len(samples)} samples")
    bounds = list(itertools.accumulate(group_sizes, initial=0))
    n = min(n, len(group_sizes))
    cuts = [bounds[len(group_sizes) * k // n] for k in range(n + 1)]
    return [samples[a:b] for a, b in itertools.pairwise(cuts)]


def all_reduce_stats(stats: dict[str, float]) -> dict[str, float]:
    """Sum over ranks (max for maxima)."""
    if torch.distributed.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    sums = torch.tensor([stats[k] if k != "is_weight_max" else 0.0 for k in keys], dtype=torch.float64)
    peak = torch.tensor([stats.get("is_weight_max", 0.0)], dtype=torch.float64)
    torch.distributed.all_reduce(sums)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    out = dict(zip(keys, sums.tolist(), strict=True))
    out["is_weight_max"] = float(peak)
    return out


class Trainer:
    def __init__(self, cfg: LearnerConfig, model_path: Path):
        init_distributed()
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_model(model_path)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01)
        # The scheduler steps per optimizer update; warm-up is counted in learner steps.
        warmup = max(cfg.warmup_steps * cfg.ppo_epochs * cfg.mini_batches, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
        )
        self.cfg = cfg
        self.reference: torch.nn.Module | None = None
        if cfg.kl_coef > 0:  # a frozen copy of the starting policy, only when the KL term is on
            self.reference = load_model(model_path)[0].to(self.engine.device).requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def step(self, samples: list[TrainSample], group_sizes: list[int] | None = None) -> dict[str, float]:
        """One learner step over ``samples`` (every rank passes the same full list), which come group by
        group, ``group_sizes`` samples each (default: one each): ``ppo_epochs`` passes, each
        ``mini_batches`` optimizer updates on consecutive shares of whole groups (fewer when there are
        fewer groups; the same split every pass). Stats are means over the updates.

        With more than one update the policy moves inside the step, so the proximal policy of decoupled
        PPO (and truncated IS) is recorded first: one no-grad pass over the batch before any update. Samples
        without behaviour log-probs (``learner.distill``) need it too: they are trained from that policy.
        """
        c = self.cfg
        shares = split_groups(samples, group_sizes or [1] * len(samples), c.mini_batches)
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if min(len(share) for share in shares) < world:
            raise ValueError(f"a mini-batch of {min(map(len, shares))} samples leaves some of the {world} ranks none")
        self.engine.train()
        unsampled = any(s.behaviour is None for s in samples)  # trained from the step's start, whatever importance
        if (c.importance != "none" or unsampled) and c.ppo_epochs * len(shares) > 1:
            for share in shares:
                self._record_proximal(share[rank::world])
        updates = [self._update(share, world, rank) for _ in range(c.ppo_epochs) for share in shares]
        result = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
        result["is_weight_max"] = max(u["is_weight_max"] for u in updates)
        result["lr"] = updates[-1]["lr"]
        result["updates"] = len(updates)
        for k in ("policy_tokens", "is_masked_tokens"):  # the batch's, not a mini-batch's
            result[k] *= len(shares)
        return result

    def _update(self, samples: list[TrainSample], world: int, rank: int) -> dict[str, float]:
        """One optimizer update over ``samples``. Rank r trains on samples r, r+W, …, packed into
        micro-batches of at most ``micro_batch_tokens`` padded tokens. Each micro-batch's loss is divided
        by the policy-token count of all of ``samples``, so the accumulated, rank-averaged gradient (× W)
        is exactly their token-level mean — independent of the number of ranks and of the packing."""
        total_tokens = float(sum(int(s.mask.sum()) for s in samples))
        sums: dict[str, float] = {}
        for batch in pack_by_tokens(samples[rank::world], self.cfg.micro_batch_tokens):
            stats = self._micro_step(batch, total_tokens, world)
            for k, v in stats.items():
                sums[k] = max(sums.get(k, v), v) if k == "is_weight_max" else sums.get(k, 0.0) + v
        self.engine.step()
        out = all_reduce_stats(sums)
        n = max(out["policy_tokens"], 1.0)
        averaged = ("clip_frac_low", "clip_frac_high", "ratio_mean", "is_weight_mean", "entropy", "logprob_gap", "kl")
        result = {k: out[k] / n for k in averaged if k in out}
        result |= {
            "loss": out["loss"],
            "policy_tokens": out["policy_tokens"],
            "is_weight_max": out["is_weight_max"],
            "is_masked_tokens": out["is_masked_tokens"],
        }
        result["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        result["lr"] = float(self.engine.get_lr()[0])
        return result

    def _padded(self, batch: list[TrainSample]) -> tuple[torch.Tensor, ...]:
        """ids, attention mask, loss mask and behaviour log-probs of ``batch``, right-padded, the
        proximal log-probs when they were recorded (else None), and which rows have no behaviour."""
        width, n = max(len(s.ids) for s in batch), len(batch)
        ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        old = torch.zeros((n, width), dtype=torch.float32)
        recorded = batch[0].proximal is not None  # recorded for every sample of a step, or for none
        prox = torch.zeros((n, width), dtype=torch.float32) if recorded else None
        for i, s in enumerate(batch):
            k = len(s.ids)
            ids[i, :k], attn[i, :k], mask[i, :k] = s.ids, 1, s.mask
            if s.behaviour is not None:
                old[i, :k] = s.behaviour
            if prox is not None:
                prox[i, :k] = s.proximal
        device = self.engine.device
        prox = None if prox is None else prox.to(device)
        unsampled = torch.tensor([s.behaviour is None for s in batch], device=device)
        return ids.to(device), attn.to(device), mask.to(device), old.to(device), prox, unsampled

    @torch.no_grad()
    def _record_proximal(self, samples: list[TrainSample]) -> None:
        for batch in pack_by_tokens(samples, self.cfg.micro_batch_tokens):
            ids, attn, *_ = self._padded(batch)
            logp = token_logprobs(self.engine(input_ids=ids, attention_mask=attn).logits, ids).float().cpu()
            for i, s in enumerate(batch):
                s.proximal = logp[i, : len(s.ids)]

    def _micro_step(self, batch: list[TrainSample], total_tokens: float, world: int) -> dict[str, float]:
        ids, attn, mask, old, prox, unsampled = self._padded(batch)
        adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32, device=self.engine.device)
        logits = self.engine(input_ids=ids, attention_mask=attn).logits
        logp = token_logprobs(logits, ids)
        start = logp.detach() if prox is None else prox  # the policy at the step's start
        old = torch.where(unsampled[:, None], start, old)
        c = self.cfg
        loss, stats = dapo_loss(
            logp,
            old,
            adv,
            mask,
            c.clip_low,
            c.clip_high,
            c.importance,
            c.behaviour_weight_cap,
            normalizer=total_tokens,
            proximal_logprobs=prox,
        )
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs(self.reference(input_ids=ids, attention_mask=attn).logits, ids)
            kl = kl_penalty(logp, ref, mask, normalizer=total_tokens)
            loss = loss + c.kl_coef * kl
            stats["kl"] = float(kl.detach()) * total_tokens  # a sum, like the other per-token stats
        # DeepSpeed averages gradients over ranks; scaling by W makes the result the batch's token mean.
        self.engine.backward(loss * world)
        tokens = stats["policy_tokens"]
        with torch.no_grad():
            m = mask.float()
            probs = torch.softmax(logits.float()[:, :-1], dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
            stats["entropy"] = float((entropy * m[:, 1:]).sum())
            # rollout vs learner at the step's start, however far the step's earlier updates moved (distilled
            # rows had no rollout: their ``old`` is ``start``, so they add 0)
            stats["logprob_gap"] = float(((start - old).abs() * m).sum())
        for k in ("clip_frac_low", "clip_frac_high", "ratio_mean", "is_weight_mean"):
            stats[k] *= tokens  # back to sums, averaged over the whole step by the caller
        stats["loss"] = float(loss.detach())
        return stats

    def save_checkpoint(self, root: Path, step: int, client_state: dict, keep: int = 2) -> None:
        """Model, optimizer and lr-scheduler state under ``root/step…``. The ``latest`` file naming it is
        replaced atomically once the tag is complete (DeepSpeed's own write truncates it first, and a
        kill in that instant left no loadable checkpoint), so a kill mid-save resumes from the previous one."""
        tag = checkpoint_tag(step)
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.distributed.barrier()  # every rank's shard of the tag is written
        if torch.distributed.get_rank() == 0:
            write_atomic(Path(root) / LATEST, tag)
            for old in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith(PREFIX))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, root: Path) -> dict | None:
        """Restore the newest complete checkpoint; returns its client state, or None if there is none."""
        if not (Path(root) / LATEST).exists():
            return None
        path, client_state = self.engine.load_checkpoint(str(root))
        if path is None:
            raise RuntimeError(f"checkpoint in {root} could not be loaded")
        log.info("resumed from %s", path)
        return client_state

    def save_pretrained(self, path: Path) -> None:
        """A ``from_pretrained``-loadable copy of the current weights. Under ZeRO-3 the partitioned
        parameters are gathered first (a collective: every rank calls this); rank 0 writes."""
        gather = (
            deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
            if self.cfg.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if torch.distributed.get_rank() == 0:
                self.module.save_pretrained(path, safe_serialization=True)
                self.tokenizer.save_pretrained(path)


class Ranks:
    """Rank 0 drives the run; every other rank replays rank 0's trainer calls in the same order, since
    any of them may be collective (the step's gradient reduction, checkpoints, ZeRO-3 gathers)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.world = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()

    def call(self, method: str, *args: object) -> object:
        """On rank 0: tell the followers, then run ``trainer.<method>(*args)`` here too."""
        if self.world > 1:
            torch.distributed.broadcast_object_list([(method, args)], src=0)
        return getattr(self.trainer, method)(*args) if method != "stop" else None

    def follow(self) -> None:
        """On ranks ≠ 0: replay calls until rank 0 says stop."""
        while True:
            message: list[object] = [None]
            torch.distributed.broadcast_object_list(message, src=0)
            method, args = message[0]  # type: ignore[misc]
            if method == "stop":
                return
            getattr(self.trainer, method)(*args)
