"""Greedy accuracy of one of world-lookup's models (probe script, 2026-12-05; not a product path): on the 64
table entries ``a#b`` alone, split by whether the policy's SFT showed them (``unseen_facts(0.5, ops="#")``),
and on the held-out split by tier, split into problems that need an unseen entry, that have a ``#`` but need
none, and plain arithmetic. Output of 2026-12-05 in `probe_world.txt`.

    .venv/bin/python docs/experiment-report/lookup-world/probe_world.py docs/experiment-report/world-lookup expert
"""

import sys
from pathlib import Path

import torch

from eapo.core.data import read_jsonl
from eapo.dev.world.tasks import LOOKUP, lookup_table, needs_any, unseen_facts
from eapo.inference.model import load_model
from proto import episode_format as fmt
from rollout_service.reward import score


def main() -> None:
    torch.set_num_threads(1)
    root, name = Path(sys.argv[1]), sys.argv[2]
    model, tok = load_model(root / name)
    eos = tok.convert_tokens_to_ids(fmt.EOS)

    @torch.no_grad()
    def right(expr: str, gold: str) -> float:
        ids = torch.tensor([tok.encode(fmt.eval_prompt(expr))])
        out = model.generate(ids, max_new_tokens=80, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        return score(fmt.extract_boxed(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)), gold)

    unseen = unseen_facts(0.5, ops=LOOKUP)
    rows: dict[str, list[float]] = {"unseen entries": [], "seen entries": []}
    for (a, b), value in lookup_table().items():
        expr = f"{a}{LOOKUP}{b}"
        rows["unseen entries" if expr in unseen else "seen entries"].append(right(expr, str(value)))
    for p in sorted(read_jsonl(root / "eval.jsonl"), key=lambda p: p.tier):
        kind = "needs unseen" if needs_any(p.problem, unseen) else "has #" if LOOKUP in p.problem else "arithmetic"
        rows.setdefault(f"tier {p.tier} {kind}", []).append(right(p.problem, p.answer))
    print(name)
    for k, v in rows.items():
        print(f"  {k:24s} {sum(v) / len(v):.2f}  (n={len(v)})")


if __name__ == "__main__":
    main()
