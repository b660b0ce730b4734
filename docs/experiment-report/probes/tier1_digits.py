"""Where a policy's tier-1 answers alone go wrong (probe script, 2026-12-04; not a product path).

Teacher-forced on the held-out tier-1 problems under the evaluation prompt (``Q: a∘b\\nA: ``), for each
checkpoint: the probability of ``=`` after the restated operation (a consult query ``<consult>a∘b`` ends
there with ``</consult>``, so a leak of the query shows as mass taken from ``=``), of ``<consult>`` as the
first token, of the right first digit of the result (after its sign, teacher-forced), and of an operand
digit that is not the right one (a copy from the prompt). Also the L2 distance of the weights from a
reference checkpoint. Output of 2026-12-04 in `tier1_digits.txt`.

    .venv/bin/python docs/experiment-report/probes/tier1_digits.py docs/experiment-report/world/eval.jsonl \\
        docs/experiment-report/world/policy base=docs/experiment-report/world/policy eapo-0=runs/…/v000100
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import fmean

import torch
from safetensors.torch import load_file

from eapo.dev.world.tasks import solution_steps
from eapo.inference.model import load_model
from proto import episode_format as fmt


@torch.no_grad()
def next_token_probs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def measure(path: Path, problems: list[dict]) -> dict[str, float]:
    model, tok = load_model(path)
    tid = lambda text: tok.encode(text)[0]  # noqa: E731 (one character, one token in the tiny world)
    rows: dict[str, list[float]] = {k: [] for k in ("p(=)", "p(<consult>)", "p(right digit)", "p(operand digit)")}
    for p in problems:
        op, value = solution_steps(p["problem"])[0]
        prompt = tok.encode(fmt.eval_prompt(p["problem"]))
        rows["p(<consult>)"].append(next_token_probs(model, prompt)[tok.convert_tokens_to_ids(fmt.CONSULT_OPEN)].item())
        rows["p(=)"].append(next_token_probs(model, prompt + tok.encode(op))[tid("=")].item())
        sign = "-" if value < 0 else ""  # teacher-forced: the digit after it is the one looked up
        probs = next_token_probs(model, prompt + tok.encode(op + "=" + sign))
        right = str(abs(value))[0]
        rows["p(right digit)"].append(probs[tid(right)].item())
        rows["p(operand digit)"].append(sum(probs[tid(c)].item() for c in set(op) - {right} if c.isdigit()))
    return {k: fmean(v) for k, v in rows.items()}


def distance(path: Path, reference: dict[str, torch.Tensor]) -> float:
    weights = load_file(path / "model.safetensors")
    return sum(((weights[k].float() - v.float()) ** 2).sum().item() for k, v in reference.items()) ** 0.5


def main() -> None:
    torch.set_num_threads(1)
    dataset, reference, *specs = sys.argv[1:]
    problems = [p for p in map(json.loads, Path(dataset).read_text().splitlines()) if p["tier"] == 1]
    ref = load_file(Path(reference) / "model.safetensors")
    print(f"{len(problems)} tier-1 problems, evaluation prompt")
    for spec in specs:
        name, path = spec.split("=", 1)
        row = measure(Path(path), problems)
        cells = "  ".join(f"{k} {v:.3f}" for k, v in row.items())
        print(f"{name:12s} {cells}  |dθ| {distance(Path(path), ref):.3f}")


if __name__ == "__main__":
    main()
