"""Optional experiment-tracking sinks: TensorBoard and Weights & Biases, beside ``metrics.jsonl``.

``metrics.jsonl`` and the eval JSON files stay the source of truth: these sinks only mirror their numeric
values (nested mappings flattened with ``/``), so a run with a broken sink is still complete. Both
libraries are imported only when their sink is on. W&B's offline mode needs no network; ``wandb sync
<run_dir>/wandb/offline-run-*`` uploads a run later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from eapo.core.config import EAPOConfig

log = logging.getLogger(__name__)


def scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of ``metrics``, nested keys joined with ``/``; strings, lists and None are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class Tracker:
    """The configured sinks of one job (``learner``, ``eval``) of a run."""

    def __init__(self, cfg: EAPOConfig, job: str):
        tc, self.job = cfg.tracking, job
        self._tensorboard = self._wandb = None
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(cfg.run_dir / "tensorboard" / job))
        if tc.wandb:
            import wandb

            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=tc.wandb_project,
                mode=tc.wandb_mode,
                dir=str(cfg.run_dir),
                group=cfg.run_dir.name,  # one run directory: its learner and eval jobs side by side
                name=f"{cfg.run_dir.name}-{job}",
                job_type=job,
                config=cfg.model_dump(mode="json"),  # secrets appear masked
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Mirror ``metrics``; a sink that fails is dropped with a warning: a mirror never stops training."""
        values = {f"{self.job}/{name}": value for name, value in scalars(metrics).items()}
        for sink, write in (("_tensorboard", self._write_tensorboard), ("_wandb", self._write_wandb)):
            if getattr(self, sink) is None:
                continue
            try:
                write(values, step)
            except Exception:
                log.warning(
                    "%s sink failed at step %d; dropped (metrics.jsonl is complete)", sink[1:], step, exc_info=True
                )
                setattr(self, sink, None)

    def _write_tensorboard(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def _write_wandb(self, values: dict[str, float], step: int) -> None:
        self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
