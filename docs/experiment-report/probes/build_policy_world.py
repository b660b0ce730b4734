"""The probe worlds' builder: the shipped world's splits and experts, and a policy of another size SFT'd as
the shipped one was (the same steps, batch and seed; the same curriculum unless one is named). Not a product
path: the probes of 2026-12-04 ran on what it built, and it built the shipped world-unseen and world-lookup-copy
(2026-12-05). A fifth argument names another world to take the splits, experts and config from.

    .venv/bin/python docs/experiment-report/probes/build_policy_world.py runs/probes/world-2x128 128 2
    .venv/bin/python docs/experiment-report/probes/build_policy_world.py runs/world-unseen 64 2 policy_unseen
    .venv/bin/python docs/experiment-report/probes/build_policy_world.py runs/world-lookup-copy 64 2 \\
        policy_lookup_copy docs/experiment-report/world-lookup
"""

import json
import shutil
import sys
import time
from pathlib import Path

from eapo.core.config import ModelSpec, WorldConfig
from eapo.dev.world.bootstrap import _fingerprint, world_manifest
from eapo.dev.world.sft import train_model

root, hidden, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
curriculum = sys.argv[4] if len(sys.argv) > 4 else "policy"
SHIPPED = Path(sys.argv[5] if len(sys.argv) > 5 else "docs/experiment-report/world")
policy = ModelSpec(curriculum=curriculum, hidden=hidden, layers=layers, sft_steps=800)
cfg = WorldConfig(**{**world_manifest(SHIPPED)["config"], "dir": root, "policy": policy})
root.mkdir(parents=True, exist_ok=True)
for name in ("train.jsonl", "eval.jsonl"):
    shutil.copy(SHIPPED / name, root / name)
for name in ("expert", "calculator"):
    shutil.copytree(SHIPPED / name, root / name, dirs_exist_ok=True)
t0 = time.monotonic()
loss = train_model(root, "policy", cfg.policy, cfg)
manifest = {"fingerprint": _fingerprint(cfg), "config": cfg.model_dump(mode="json"), "final_sft_loss": {"policy": loss}}
(root / "world.json").write_text(json.dumps(manifest | {"seconds": round(time.monotonic() - t0, 1)}, indent=2))
print(f"policy {layers} x {hidden} ({curriculum}): SFT loss {loss:.4f} in {time.monotonic() - t0:.0f}s")
