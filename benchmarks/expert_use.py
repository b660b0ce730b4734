"""What a policy does with an expert's answer (issue #18, item 6): the held-out problems under the
training prompt with one consult whose expert block is filled by hand — the correct worked solution, a
worked solution whose last step and box are wrong, or "unavailable" — against the evaluation prompt
alone. Per case: accuracy, the share that ends on the expert's wrong answer, the share that restates
steps in its own tokens. If a correct expert barely raises accuracy, RL under the consult prompt has
little expert help to reward, whatever the schedule.

    .venv/bin/python -m benchmarks.expert_use [NAME=CHECKPOINT …] [--problems 40] [--samples 4]

Several checkpoints (the untrained policy and RL-trained ones) tell whether training changes what the
policy does with an answer: a policy that learns to copy the expert scores near 1 with a correct one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import named_path, print_table, write_result
from eapo.dev.world.tasks import solution_steps, worked_solution
from eapo.inference.model import load_model
from proto import episode_format as fmt
from proto.episode_format import extract_boxed
from rollout_service.reward import score


def wrong_solution(expr: str, answer: str) -> tuple[str, str]:
    """The worked solution with its last step's result and the box moved by 7."""
    steps, bad = solution_steps(expr), str(int(answer) + 7)
    shown = [f"{op}={value}" for op, value in steps[:-1]] + [f"{steps[-1][0]}={bad}"]
    return " ".join(shown) + f" \\boxed{{{bad}}}", bad


def cases(expr: str, answer: str) -> dict[str, tuple[str, str | None]]:
    """Case → (prompt, the wrong answer an expert showed, if any)."""
    consult = fmt.training_prompt(expr) + fmt.consult_block([expr])
    wrong, bad = wrong_solution(expr, answer)
    return {
        "correct expert": (consult + fmt.expert_block(worked_solution(expr)), None),
        "wrong expert": (consult + fmt.expert_block(wrong), bad),
        "expert unavailable": (consult + fmt.expert_block(None), None),
        "alone (eval prompt)": (fmt.eval_prompt(expr), None),
    }


Counts = dict[str, dict[str, int]]  # case → tally: n, correct, follows_wrong, restates, "n tier N", "correct tier N"


def measure(path: Path, problems: list[dict], args: argparse.Namespace) -> Counts:
    torch.manual_seed(args.seed)
    model, tok = load_model(path)
    counts: Counts = {}
    for p in problems:
        for case, (prompt, bad) in cases(p["problem"], p["answer"]).items():
            ids = torch.tensor([tok.encode(prompt)])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                num_return_sequences=args.samples,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            c = counts.setdefault(case, {"n": 0, "correct": 0, "follows_wrong": 0, "restates": 0})
            tier = f"tier {p['tier']}"
            for seq in out[:, ids.shape[1] :]:
                text = tok.decode(seq, skip_special_tokens=False)
                box = extract_boxed(text)  # judged as episodes are
                right = score(box, p["answer"]) == 1.0
                c["n"] += 1
                c["correct"] += right
                c[f"n {tier}"] = c.get(f"n {tier}", 0) + 1
                c[f"correct {tier}"] = c.get(f"correct {tier}", 0) + right
                c["follows_wrong"] += bad is not None and score(box, bad) == 1.0
                c["restates"] += "=" in text.split("\\boxed")[0]
    return counts


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    problems = [json.loads(line) for line in args.dataset.read_text().splitlines()][: args.problems]
    tiers = sorted({f"tier {p['tier']}" for p in problems})
    names = [name for name, _ in args.models]
    if len(set(names)) != len(names):
        raise SystemExit(f"checkpoint names must differ: {names}")
    raw = {name: measure(path, problems, args) for name, path in args.models}
    rows = [
        {
            "model": name,
            "case": case,
            **{k: c[k] / c["n"] for k in ("correct", "follows_wrong", "restates")},
            **{tier: c[f"correct {tier}"] / c[f"n {tier}"] for tier in tiers},
            "samples": c["n"],
        }
        for name, counts in raw.items()
        for case, c in counts.items()
    ]
    print_table(rows, ["model", "case", "correct", *tiers, "follows_wrong", "restates", "samples"])
    config = {k: str(v) for k, v in vars(args).items() if k != "models"}
    config["models"] = {name: str(path) for name, path in args.models}
    summary = {name: {r["case"]: r["correct"] for r in rows if r["model"] == name} for name in raw}
    write_result("expert_use", config, raw, summary, {})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models",
        nargs="*",
        type=named_path,
        default=[("policy", Path(".cache/world/policy"))],
        help="NAME=PATH: policy checkpoint directories (default: the tiny world's policy)",
    )
    parser.add_argument("--dataset", type=Path, default=Path(".cache/world/eval.jsonl"))
    parser.add_argument("--problems", type=int, default=40, help="the first N held-out problems (10 per tier at 40)")
    parser.add_argument("--samples", type=int, default=4, help="samples per problem and case, at temperature 1")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the rollout's own max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
