"""How far a policy is from each `#` table entry: the log-probability it gives the entry's value after
`Q: a#b\\nA: a#b=` (the start of its own solution, on the evaluation prompt), and that value's rank among
the 90 values 10–99, for the unseen entries and the seen ones. The world's policy, then each weight version
given (a run's `weights/vNNNNNN`).

    .venv/bin/python docs/experiment-report/lookup-world/fact_logprob.py WORLD [VERSION_DIR ...]   # repo root
"""

import sys
from pathlib import Path
from statistics import mean

import torch

from eapo.dev.world.tasks import lookup_table, unseen_facts
from eapo.inference.model import load_model, with_weights
from proto import episode_format as fmt
from proto.weights import load_tensors

VALUES = range(10, 100)


@torch.no_grad()
def entry_scores(model: torch.nn.Module, tok, table) -> dict[str, tuple[float, int]]:
    """Per entry ``a#b``: log p(its value) and the value's rank (1 = the policy's likeliest)."""
    out = {}
    for (a, b), value in table.items():
        prefix = tok(fmt.eval_prompt(f"{a}#{b}") + f"{a}#{b}=", add_special_tokens=False)["input_ids"]
        x = torch.tensor([prefix + tok(f"{v} ", add_special_tokens=False)["input_ids"] for v in VALUES])
        logp = torch.log_softmax(model(x).logits.float(), -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
        total = logp[:, len(prefix) - 1 :].sum(-1)
        right = total[VALUES.index(value)]
        out[f"{a}#{b}"] = (float(right), int((total > right).sum()) + 1)
    return out


def main() -> None:
    world, versions = Path(sys.argv[1]), sys.argv[2:]
    model, tok = load_model(world / "policy")
    table, unseen = lookup_table(), unseen_facts(0.5, ops="#")
    for name, m in [("policy (SFT)", model)] + [(v, with_weights(model, load_tensors(Path(v)))) for v in versions]:
        scores = entry_scores(m, tok, table)
        for label, keep in (("unseen", unseen.__contains__), ("seen", lambda k: k not in unseen)):
            rows = [s for k, s in scores.items() if keep(k)]
            print(
                f"{name}  {label:6s} mean log p {mean(lp for lp, _ in rows):7.2f}  "
                f"mean rank {mean(r for _, r in rows):5.1f}  first {sum(r == 1 for _, r in rows):2d}/{len(rows)}"
            )


if __name__ == "__main__":
    main()
