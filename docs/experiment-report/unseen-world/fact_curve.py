"""What a run's policy knows alone, step by step, without sampling noise: the mean log-probability of the
single-digit facts' results (``Q: 7*8`` / ``A: 7*8=`` → ``56 ``), the facts world-unseen's policy never saw
and those it did, and of the held-out problems' worked solutions (``<eos>`` included), those that need an
unseen fact and those that need none; all under the evaluation prompt. Reads every weight version a run
kept (an experiment with ``keep_weights: judged`` keeps those its curve judged); step 0 is the SFT policy.

    .venv/bin/python docs/experiment-report/unseen-world/fact_curve.py WORLD RUN_DIR [RUN_DIR ...]   # repo root
"""

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
    solution = {
        p.id: solution_logprob(
            model, *encode_pair(tok, fmt.eval_prompt(p.problem), worked_solution(p.problem) + fmt.EOS), None
        )
        for p in held_out
    }
    needs = {p.id: needs_any(p.problem, unseen) for p in held_out}
    return {
        "unseen facts": fmean(v for f, v in fact.items() if f in unseen),
        "seen facts": fmean(v for f, v in fact.items() if f not in unseen),
        "solutions needing an unseen fact": fmean(v for i, v in solution.items() if needs[i]),
        "solutions needing none": fmean(v for i, v in solution.items() if not needs[i]),
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
        print("  step                               " + " ".join(f"{s:>6d}" for s in steps))
        for key in rows[0]:
            print(f"  {key:34s} " + " ".join(f"{rows[s][key]:6.2f}" for s in steps))


if __name__ == "__main__":
    main()
