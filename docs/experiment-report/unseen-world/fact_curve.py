"""What a run's policy knows alone, step by step, without sampling noise, all under the evaluation prompt:
the mean log-probability of the single-digit facts' results (``Q: 7*8`` / ``A: 7*8=`` → ``56 ``), the facts
world-unseen's policy never saw and those it did; and the mean probability of each held-out problem's
worked solution (``<eos>`` included), the chance that one sample at temperature 1 writes it, which is what
mean@4 counts (less the rare right answer by another path), for the problems that need an unseen fact and
those that need none, the latter also by tier, and how sure the policy is to close a right chain of steps
with its box and ``<eos>`` (rather than write another step). Reads every weight version a run
kept (an experiment with ``keep_weights: judged`` keeps those its curve judged); step 0 is the SFT policy.

    .venv/bin/python docs/experiment-report/unseen-world/fact_curve.py WORLD RUN_DIR [RUN_DIR ...]   # repo root
"""

import math
import sys
from pathlib import Path
from statistics import fmean

import torch

from benchmarks.solution_likelihood import encode_pair, solution_logprob
from eapo.core.data import read_jsonl
from eapo.dev.world.tasks import needs_any, solution_steps, unseen_facts, worked_solution
from eapo.inference.model import load_model, with_weights
from proto import episode_format as fmt
from proto.weights import load_tensors, published_versions, version_dir

FACTS = [f"{a}{op}{b}" for op in "+-*" for a in range(2, 10) for b in range(2, 10)]


def scores(model: torch.nn.Module, tok, held_out: list, unseen: frozenset[str]) -> dict[str, float]:
    fact = {}
    for f in FACTS:
        value = solution_steps(f)[-1][1]
        prompt, answer = encode_pair(tok, fmt.eval_prompt(f) + f"{f}=", f"{value} ")
        fact[f] = solution_logprob(model, prompt, answer, None)
    whole, box = {}, {}  # log p of the worked solution; of its `\boxed{…}<eos>` given the steps before it
    for p in held_out:
        text = worked_solution(p.problem)
        steps, boxed = text[: text.index("\\boxed")], text[text.index("\\boxed") :] + fmt.EOS
        whole[p.id] = solution_logprob(model, *encode_pair(tok, fmt.eval_prompt(p.problem), text + fmt.EOS), None)
        box[p.id] = solution_logprob(model, *encode_pair(tok, fmt.eval_prompt(p.problem) + steps, boxed), None)
    none = [p for p in held_out if not needs_any(p.problem, unseen)]
    return {
        "unseen facts": fmean(v for f, v in fact.items() if f in unseen),
        "seen facts": fmean(v for f, v in fact.items() if f not in unseen),
        "P(solution), needing an unseen fact": fmean(math.exp(whole[p.id]) for p in held_out if p not in none),
        "P(solution), needing none": fmean(math.exp(whole[p.id]) for p in none),
        "… tier 1": fmean(math.exp(whole[p.id]) for p in none if p.tier == 1),
        "… tier 2": fmean(math.exp(whole[p.id]) for p in none if p.tier == 2),
        "… log p(box, eos | steps), tier ≥ 2": fmean(box[p.id] for p in none if p.tier >= 2),
    }


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    world, runs = Path(sys.argv[1]), [Path(r) for r in sys.argv[2:]]
    base, tok = load_model(world / "policy")
    held_out, unseen = read_jsonl(world / "eval.jsonl"), unseen_facts(0.5, ops="+-*")
    for run in runs:
        print(f"\n{run}")
        steps = sorted({0, *published_versions(run / "weights")})
        rows = {}
        for step in steps:
            model = base if step == 0 else with_weights(base, load_tensors(version_dir(run / "weights", step)))
            rows[step] = scores(model, tok, held_out, unseen)
        print("  step                                 " + " ".join(f"{s:>6d}" for s in steps))
        for key in rows[0]:
            print(f"  {key:36s} " + " ".join(f"{rows[s][key]:6.3f}" for s in steps))


if __name__ == "__main__":
    main()
