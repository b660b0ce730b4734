"""``benchmarks.expert_use`` tallies per case and tier as a policy's answers warrant: a policy that copies
the expert answer it is shown on one-operation problems only scores 1 there and 0 elsewhere, follows a
wrong answer exactly where it copies, and scores 0 without an answer."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

import benchmarks.expert_use as expert_use
from eapo.core.config import WorldConfig
from eapo.dev.world.sft import build_tokenizer
from eapo.dev.world.tasks import make_split


class TierOneCopier:
    """Answers with the last expert block it reads when the problem has one operation; otherwise, and
    without an expert block, with a box no problem has."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, ids: torch.Tensor, num_return_sequences: int, **_) -> torch.Tensor:
        text = self.tok.decode(ids[0])
        problem = re.search(r"Q: (\S+)\n", text).group(1)
        shown = re.findall(r"<expert>(.*?)</expert>", text)
        one_op = len(re.findall(r"(?<=\d)[-+*]", problem)) == 1
        answer = self.tok.encode(shown[-1] if shown and one_op else "\\boxed{100000}")
        return torch.tensor([ids[0].tolist() + answer] * num_return_sequences)


@pytest.fixture
def copier(monkeypatch):
    tok = build_tokenizer()
    monkeypatch.setattr(expert_use, "load_model", lambda path: (TierOneCopier(tok), tok))


def test_tallies_follow_the_answers_tier_by_tier(copier):
    problems = [p.__dict__ for p in make_split(WorldConfig().seed, 8, "eval")]  # two of each tier
    counts = expert_use.measure(None, problems, argparse.Namespace(seed=0, samples=3, max_new_tokens=48))
    right, wrong = counts["correct expert"], counts["wrong expert"]
    assert [right[f"n tier {t}"] for t in (1, 2, 3, 4)] == [6, 6, 6, 6] and right["n"] == 24
    assert [right[f"correct tier {t}"] for t in (1, 2, 3, 4)] == [6, 0, 0, 0] and right["correct"] == 6
    assert [wrong[f"correct tier {t}"] for t in (1, 2, 3, 4)] == [0, 0, 0, 0]
    assert wrong["follows_wrong"] == 6  # the tier-1 copies of a wrong answer
    assert counts["expert unavailable"]["correct"] == counts["alone (eval prompt)"]["correct"] == 0
    assert right["restates"] == 6 and counts["alone (eval prompt)"]["restates"] == 0


def test_main_reports_each_checkpoint_per_tier_and_refuses_a_repeated_name(copier, monkeypatch, tmp_path):
    dataset = tmp_path / "eval.jsonl"
    dataset.write_text("".join(json.dumps(p.__dict__) + "\n" for p in make_split(WorldConfig().seed, 8, "eval")))
    written = {}
    monkeypatch.setattr(expert_use, "write_result", lambda name, config, raw, summary, targets: written.update(summary))
    args = dict(dataset=dataset, problems=8, samples=2, max_new_tokens=48, seed=0)
    expert_use.main(argparse.Namespace(models=[("a", Path("x")), ("b", Path("y"))], **args))
    assert written == {m: {"correct expert": 0.25, "wrong expert": 0.0, "expert unavailable": 0.0,
                           "alone (eval prompt)": 0.0} for m in ("a", "b")}  # fmt: skip
    with pytest.raises(SystemExit, match="names must differ"):
        expert_use.main(argparse.Namespace(models=[("a", Path("x")), ("a", Path("y"))], **args))
