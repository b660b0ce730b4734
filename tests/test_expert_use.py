"""``benchmarks.expert_use`` tallies per case and tier as a policy's answers warrant: a policy that copies
whatever expert answer it is shown scores 1 with a right one, follows every wrong one, and 0 without."""

import argparse
import re

import torch

import benchmarks.expert_use as expert_use
from eapo.core.config import WorldConfig
from eapo.dev.world.sft import build_tokenizer
from eapo.dev.world.tasks import make_split


class CopyingPolicy:
    """Answers with the text of the last expert block it reads; with none, with a wrong box."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, ids: torch.Tensor, num_return_sequences: int, **_) -> torch.Tensor:
        shown = re.findall(r"<expert>(.*?)</expert>", self.tok.decode(ids[0]))
        answer = self.tok.encode(shown[-1] if shown else "\\boxed{100000}")
        return torch.tensor([ids[0].tolist() + answer] * num_return_sequences)


def test_a_copying_policy_scores_one_with_a_right_answer_follows_a_wrong_one_and_scores_zero_without(monkeypatch):
    tok = build_tokenizer()
    monkeypatch.setattr(expert_use, "load_model", lambda path: (CopyingPolicy(tok), tok))
    problems = [p.__dict__ for p in make_split(WorldConfig().seed, 8, "eval")]  # two of each tier
    args = argparse.Namespace(seed=0, samples=3, max_new_tokens=48)
    counts = expert_use.measure(None, problems, args)
    right, wrong = counts["correct expert"], counts["wrong expert"]
    assert right["n"] == 24 and [right[f"n tier {t}"] for t in (1, 2, 3, 4)] == [6, 6, 6, 6]
    assert right["correct"] == 24 and all(right[f"correct tier {t}"] == 6 for t in (1, 2, 3, 4))
    assert (wrong["correct"], wrong["follows_wrong"]) == (0, 24)
    assert counts["expert unavailable"]["correct"] == counts["alone (eval prompt)"]["correct"] == 0
    assert right["restates"] == 24 and counts["alone (eval prompt)"]["restates"] == 0
