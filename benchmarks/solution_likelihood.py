"""How well a policy knows the worked solutions when it answers alone, without sampling noise (issue #18,
item 6): the exact log-likelihood of each held-out problem's worked solution (teacher-forced, ``<eos>``
included), per tier, under the evaluation prompt, and under the training prompt given that the first token
is not ``<consult>`` (the policy answering alone where it could consult). Two seeds of a held-out curve
differ by ±0.02 in mean@4; this separates a policy that lost what it knew from one that draws differently,
and tells whether a loss shows under one prompt or both (a prompt-transfer effect shows only under the
evaluation prompt). The prompts are the tiny world's (``eval_prompt``, ``training_prompt``).

    .venv/bin/python -m benchmarks.solution_likelihood sft=.cache/world/policy eapo-100=runs/…/weights/v000100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean

import torch
from transformers import PreTrainedTokenizerBase

from benchmarks.common import named_path, print_table, write_result
from eapo.dev.world.tasks import worked_solution
from eapo.inference.model import load_model
from proto import episode_format as fmt

PROMPTS = ("eval prompt", "training prompt, alone")


@torch.no_grad()
def solution_logprob(model: torch.nn.Module, prompt: list[int], solution: list[int], exclude: int | None) -> float:
    """log p(solution | prompt); with ``exclude``, conditioned on the first token not being ``exclude``."""
    logits = model(torch.tensor([prompt + solution])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    total = logp[torch.arange(len(solution)), torch.tensor(solution)].sum().item()
    if exclude is not None:  # minus log p(first token is not ``exclude``), finite however sure the model is
        total -= torch.logsumexp(torch.cat([logp[0, :exclude], logp[0, exclude + 1 :]]), dim=0).item()
    return total


def encode_pair(tok: PreTrainedTokenizerBase, prompt: str, solution: str) -> tuple[list[int], list[int]]:
    """Prompt and solution ids, refused where the two encoded apart are not the text encoded whole (a BPE
    merge across the boundary): the likelihood would be of a tokenization the model never reads."""
    ids = (tok.encode(prompt), tok.encode(solution))
    if ids[0] + ids[1] != tok.encode(prompt + solution):
        raise SystemExit(f"{prompt + solution!r}: the tokenizer merges across the prompt/solution boundary")
    return ids


def measure(path: Path, problems: list[dict]) -> dict[str, dict[str, float]]:
    model, tok = load_model(path)
    consult = tok.convert_tokens_to_ids(fmt.CONSULT_OPEN)
    by_tier: dict[str, dict[str, list[float]]] = {}
    for p in problems:
        solution = worked_solution(p["problem"]) + fmt.EOS
        row = by_tier.setdefault(str(p["tier"]), {prompt: [] for prompt in PROMPTS})
        row["eval prompt"].append(
            solution_logprob(model, *encode_pair(tok, fmt.eval_prompt(p["problem"]), solution), None)
        )
        training = encode_pair(tok, fmt.training_prompt(p["problem"]), solution)
        row["training prompt, alone"].append(solution_logprob(model, *training, consult))
    return {tier: {k: fmean(v) for k, v in row.items()} for tier, row in sorted(by_tier.items())}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    problems = [json.loads(line) for line in args.dataset.read_text().splitlines()]
    raw = {name: measure(path, problems) for name, path in args.models}
    rows = [
        {"model": name, "prompt": prompt, **{f"tier {t}": raw[name][t][prompt] for t in raw[name]}}
        for name in raw
        for prompt in PROMPTS
    ]
    tiers = [f"tier {t}" for t in next(iter(raw.values()))]
    print_table(rows, ["model", "prompt", *tiers])
    config = {"models": {name: str(path) for name, path in args.models}, "dataset": str(args.dataset)}
    config["problems"] = len(problems)
    summary = {
        name: {prompt: fmean(tier[prompt] for tier in by_tier.values()) for prompt in PROMPTS}
        for name, by_tier in raw.items()
    }
    write_result(args.name, config, raw, summary, {})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=named_path, help="NAME=PATH: a policy checkpoint directory")
    parser.add_argument("--dataset", type=Path, default=Path(".cache/world/eval.jsonl"))
    parser.add_argument("--name", default="solution_likelihood", help="the result file: results/NAME.json")
    main(parser.parse_args())
