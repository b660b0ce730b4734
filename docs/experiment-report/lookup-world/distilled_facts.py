"""How often a run's `learner.internalize` distilled each unseen `#` table entry: per entry, the distilled
samples whose problem needs it. Runs since `distilled_prompts` was recorded are read from `metrics.jsonl`;
older ones are rebuilt from the run's Redis append-only file (every trajectory group it streamed) by the
learner's own rule (`learner.distill`, the run's config).

    .venv/bin/python docs/experiment-report/lookup-world/distilled_facts.py WORLD RUN_DIR [RUN_DIR ...]
"""

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import yaml
from transformers import PreTrainedTokenizerFast

from eapo.core.config import EAPOConfig
from eapo.core.data import read_jsonl
from eapo.dev.world.tasks import solution_steps, unseen_facts
from learner.distill import distilled_samples
from learner.loss import sample_advantages
from proto import TrajectoryGroup, decode


def resp_commands(buf: bytes) -> Iterator[list[bytes]]:
    """The commands of a Redis AOF: RESP arrays (``*N``) of bulk strings (``$len``)."""
    i = 0
    while i < len(buf):
        end = buf.index(b"\r\n", i)
        argc, i, args = int(buf[i + 1 : end]), end + 2, []
        for _ in range(argc):
            end = buf.index(b"\r\n", i)
            n = int(buf[i + 1 : end])
            args.append(buf[end + 2 : end + 2 + n])
            i = end + 4 + n
        yield args


def distilled_problems(
    run: Path, metrics: list[dict], tok: PreTrainedTokenizerFast, train: dict[str, str]
) -> list[str]:
    """The problem of every distilled sample of the run, in step order (``train``: problem id to problem)."""
    if all("distilled_prompts" in m for m in metrics):
        return [train[pid.rpartition("@")[0] or pid] for m in metrics for pid in m["distilled_prompts"]]
    cfg = EAPOConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    groups = {}
    for path in sorted((run / "redis" / "appendonlydir").glob("*.aof")):
        for args in resp_commands(path.read_bytes()):
            if args[0].upper() == b"XADD" and args[1].endswith(b":stream:trajectories"):
                g = decode(args[-1], TrajectoryGroup)
                groups[g.group_id] = g
    missing = {gid for m in metrics for gid in m["group_ids"]} - groups.keys()
    if missing:  # an AOF rewrite folds earlier entries into its base: those XADDs are no longer there
        raise SystemExit(f"{run}: {len(missing)} trained groups are not in the append-only file; cannot rebuild")
    out = []
    for m in metrics:
        for gid in m["group_ids"]:
            g = groups[gid]
            out += [g.prompt.problem] * len(distilled_samples(g, sample_advantages(g, cfg.learner), tok, cfg.learner))
    return out


def main() -> None:
    world = Path(sys.argv[1])
    tok = PreTrainedTokenizerFast.from_pretrained(world / "policy")
    train = {p.id: p.problem for p in read_jsonl(world / "train.jsonl")}
    unseen = unseen_facts(0.5, ops="#")
    for run in map(Path, sys.argv[2:]):
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        problems = distilled_problems(run, metrics, tok, train)
        per_entry = Counter(f for p in problems for f in {op for op, _ in solution_steps(p)} & unseen)
        needing = sum(bool({op for op, _ in solution_steps(p)} & unseen) for p in problems)
        counts = sorted((per_entry[f] for f in unseen), reverse=True)
        print(f"{run}: {len(problems)} distilled samples, {needing} of them need an unseen entry")
        print(f"  per unseen entry: {counts} (median {counts[len(counts) // 2]})")


if __name__ == "__main__":
    main()
