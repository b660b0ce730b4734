"""``eapo bootstrap``: build the tiny world on CPU — task splits, tokenizer, policy and expert models.

Deterministic from ``world.seed`` and cached: a world whose recorded settings match is reused.
Models are transformers Qwen2 causal LMs saved with ``save_pretrained`` (safetensors) and read back
with ``from_pretrained``, so the same loading code serves a real checkpoint. What the models are and
how they are trained is ``eapo.dev.world.sft``; this module only checks, builds and records a world,
without loading torch (a reused world costs ``eapo up`` no torch import).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from eapo.core.config import ModelSpec, WorldConfig
from eapo.core.data import write_jsonl
from eapo.core.logs import setup_logging
from eapo.dev.world.tasks import make_split
from proto import episode_format as fmt
from proto.weights import file_sha256

log = logging.getLogger(__name__)

# The tiny world's chat template: a system message (the consult instruction) becomes the ``<tools>``
# marker, so rendered prompts are exactly ``fmt.training_prompt``/``fmt.eval_prompt`` (what SFT uses).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}" + fmt.TOOLS + "{% elif m['role'] == 'user' %}"
    "Q: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)
WORLD_FORMAT = 3  # 2: heads of 32, direct consultation re-derived; 3: byte-level symbols (same ids)


def _train(root: Path, name: str, spec: ModelSpec, cfg: WorldConfig) -> float:
    """One model's SFT, in a worker process: the import is here so that the parent never loads torch."""
    from eapo.dev.world.sft import train_model

    return train_model(root, name, spec, cfg)


def _fingerprint(cfg: WorldConfig) -> str:
    """The default task family stays out of it: it was added after worlds were built and shipped."""
    exclude = {"dir"} | ({"tasks"} if cfg.tasks == "arithmetic" else set())
    data = {**cfg.model_dump(mode="json", exclude=exclude), "chat_template": CHAT_TEMPLATE, "format": WORLD_FORMAT}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def world_digest(root: Path) -> str:
    """sha256 over every file of a built world (splits, tokenizers, weights), manifest excepted: the world's
    identity. Runs pair by seed only on the same world, and the config fingerprint alone does not show
    that two machines built the same bytes."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != root / "world.json")
    listing = "\n".join(f"{p.relative_to(root)} {file_sha256(p)}" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def world_manifest(root: Path) -> dict:
    """The world's ``world.json``, or ``{}`` where there is none (or a kill cut it short)."""
    try:
        manifest = json.loads((root / "world.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def is_built(cfg: WorldConfig) -> bool:
    """Whether ``cfg.dir`` holds a world built from ``cfg``: the one ``bootstrap`` reuses."""
    return world_manifest(Path(cfg.dir)).get("fingerprint") == _fingerprint(cfg)


def bootstrap(cfg: WorldConfig, force: bool = False) -> Path:
    """Build (or reuse) the world in ``cfg.dir``; returns that directory."""
    root = Path(cfg.dir)
    manifest = root / "world.json"
    fingerprint = _fingerprint(cfg)
    if not force and is_built(cfg):
        log.info("tiny world at %s is up to date", root)
        return root
    if not force and world_manifest(root).get("shipped"):  # records were made on it: a rebuild differs by machine
        raise SystemExit(
            f"{root.resolve()}: a shipped world, built from another world config than this one; it is not "
            "rebuilt: point `world.dir` elsewhere, or `eapo bootstrap --force` to overwrite it"
        )
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(make_split(cfg.seed, cfg.train_problems, "train", cfg.tasks), root / "train.jsonl")
    write_jsonl(make_split(cfg.seed, cfg.eval_problems, "eval", cfg.tasks), root / "eval.jsonl")
    specs = {"policy": cfg.policy, **cfg.experts}
    # One process per model, one thread each: tiny models leave cores idle when trained one by one.
    workers = min(len(specs), os.cpu_count() or 1)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    with ProcessPoolExecutor(workers, get_context("spawn"), setup_logging, ("bootstrap", level)) as pool:
        futures = {name: pool.submit(_train, root, name, spec, cfg) for name, spec in specs.items()}
        losses = {name: future.result() for name, future in futures.items()}
    manifest.write_text(
        json.dumps(
            {
                "fingerprint": fingerprint,
                "config": cfg.model_dump(mode="json"),
                "final_sft_loss": losses,
                "seconds": round(time.monotonic() - t0, 1),
            },
            indent=2,
        )
    )
    log.info("tiny world built in %.0fs at %s", time.monotonic() - t0, root)
    return root
