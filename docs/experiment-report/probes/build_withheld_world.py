"""The result-withheld probe's world: the shipped world's splits and experts, and a policy SFT'd as the
shipped one was (same size, curriculum, steps, batch and seed) except that half of its direct-consultation
traces show the expert's answer cut just before its result (``expert_gateway.degrade.withhold_result``),
the policy then writing the whole solution itself. The shipped policy never saw an expert block without a
box, and continues such a block as if it were still the expert's. Not a product path: it replaces the
policy curriculum in this process only.

    .venv/bin/python docs/experiment-report/probes/build_withheld_world.py runs/probes/world-withheld
"""

import json
import random
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

from eapo.core.config import WorldConfig
from eapo.dev.world import sft
from eapo.dev.world.bootstrap import _fingerprint
from eapo.dev.world.tasks import worked_solution
from expert_gateway.degrade import withhold_result
from proto import episode_format as fmt

SHIPPED = Path("docs/experiment-report/world")
shipped_sample = sft.policy_sample


def policy_sample(rng: random.Random, max_queries: int = 3) -> sft.Sample:
    """The shipped mixture, with half of its direct consultations shown the result-withheld answer. The
    draw comes from its own generator, so every other trace is the shipped one's."""
    prompt, body = shipped_sample(rng, max_queries)
    expr = re.search(r"Q: (.*)\n", prompt).group(1)
    full = fmt.expert_block(worked_solution(expr))
    if full in body and random.Random(zlib.crc32(body.encode())).random() < 0.5:
        body = body.replace(full, fmt.expert_block(withhold_result(worked_solution(expr))))
    return prompt, body


root = Path(sys.argv[1])
cfg = WorldConfig(dir=root)
root.mkdir(parents=True, exist_ok=True)
for name in ("train.jsonl", "eval.jsonl"):
    shutil.copy(SHIPPED / name, root / name)
for name in ("expert", "calculator"):
    shutil.copytree(SHIPPED / name, root / name, dirs_exist_ok=True)
sft.CURRICULA["policy"] = policy_sample
t0 = time.monotonic()
loss = sft.train_model(root, "policy", cfg.policy, cfg)
manifest = {"fingerprint": _fingerprint(cfg), "config": cfg.model_dump(mode="json"), "final_sft_loss": {"policy": loss}}
manifest |= {"policy_curriculum": "shipped, half the direct consultations result-withheld"}
(root / "world.json").write_text(json.dumps(manifest | {"seconds": round(time.monotonic() - t0, 1)}, indent=2))
print(f"policy: SFT loss {loss:.4f} in {time.monotonic() - t0:.0f}s")
