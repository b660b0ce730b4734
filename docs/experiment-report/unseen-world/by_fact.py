"""Held-out mean@4 of each arm over steps (seed mean), split by whether a problem needs a fact the policy's SFT
never showed (``unseen_facts(0.5, ops=OPS)``: the curricula ``policy_unseen``, OPS ``+-*``, and
``policy_lookup``, OPS ``#``). Reads the runs' per-sample scores, ``EVAL/ARM/seed-S/step-NNNNNN.json`` (as
``eapo experiment`` writes them under ``ARM/seed-S/eval/``), and the world's held-out split.

    .venv/bin/python docs/experiment-report/unseen-world/by_fact.py [EVAL [WORLD OPS]]   # from the repo root
    .venv/bin/python docs/experiment-report/unseen-world/by_fact.py docs/experiment-report/lookup-world/eval \
        docs/experiment-report/world-lookup '#'
"""

import json
import sys
from pathlib import Path
from statistics import mean

from eapo.core.data import read_jsonl
from eapo.dev.world.tasks import needs_any, unseen_facts

root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/experiment-report/unseen-world/eval")
if len(sys.argv) == 3:
    sys.exit("by_fact.py: give the world's operators after its directory (+-* for world-unseen, # for world-lookup)")
world, ops = sys.argv[2:4] if len(sys.argv) > 3 else ("docs/experiment-report/world-unseen", "+-*")
facts = unseen_facts(0.5, ops=ops)
problems = read_jsonl(Path(world) / "eval.jsonl")
needs = {p.id: needs_any(p.problem, facts) for p in problems}
tier = {p.id: p.tier for p in problems}
subsets = {
    "needs an unseen fact": lambda pid: needs[pid],
    "… tier 1 only": lambda pid: needs[pid] and tier[pid] == 1,
    "needs none": lambda pid: not needs[pid],
}
print(
    f"problems needing an unseen fact: {sum(needs.values())} of {len(needs)}, tier 1 "
    f"{sum(needs[p] for p in needs if tier[p] == 1)} of {sum(tier[p] == 1 for p in tier)}"
)
for arm in sorted(p.name for p in root.iterdir()):
    files = sorted((root / arm).glob("seed-*/step-*.json"))
    steps = sorted({f.name for f in files})
    seeds = len({f.parent for f in files})
    print(f"\n{arm} (seeds: {seeds}), steps " + " ".join(s[5:11].lstrip("0") or "0" for s in steps))
    for name, keep in subsets.items():
        row = []
        for step in steps:
            per_seed = []
            for f in (root / arm).glob(f"seed-*/{step}"):
                scores = json.loads(f.read_text())["scores"]
                per_seed.append(mean(s for pid, ss in scores.items() if keep(pid) for s in ss))
            row.append(f"{mean(per_seed):.3f}")
        print(f"  {name:22s} " + " ".join(row))
