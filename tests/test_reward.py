"""Rewards as facts: answer extraction, math equivalence, short-answer exact match and F1, each against
hand-computed values; and an episode that records them."""

import pytest
from math_verify import parse, verify
from test_episode import ScriptedEngine, anneal

from eapo.core.config import RolloutConfig
from eapo.core.data import Problem
from eapo.inference.model import load_model
from learner.step_stats import rollout_stats
from proto import PromptTask
from proto.episode_format import extract_boxed
from rollout_service.episode import run_episode
from rollout_service.reward import extract_answer, judge, normalize, score, token_f1, work_holds


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("so \\boxed{14}", "14"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one, braces balanced
        ("\\boxed{12", None),  # unclosed
        ("no box here", None),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize(
    "text, pattern, answer",
    [
        ("#### 7\n... so #### 72", "#### (.+)", "72"),  # the task's own format, last match
        ("\\boxed{5} #### 72", "#### (.+)", "5"),  # a box wins
        ("Answer: Paris  ", "Answer: (.+)", "Paris"),
        ("nothing", "#### (.+)", None),
        ("x=", "x=(\\d*)", None),  # an empty capture is no answer
        ("#### 72", None, None),  # no pattern: only boxes count
    ],
)
def test_extract_answer_falls_back_to_the_tasks_format(text, pattern, answer):
    assert extract_answer(text, pattern) == answer


@pytest.mark.parametrize(
    "answer, gold, expected",
    [("0.5", "\\frac{1}{2}", 1.0), ("1/2", "0.5", 1.0), ("14", "14", 1.0), (" 14 ", "14", 1.0), ("15", "14", 0.0),
     (None, "14", 0.0), ("", "14", 0.0), ("not math {{", "14", 0.0),
     ("6#3", "6", 0.0), ("6&3", "6", 0.0), ("6$3", "6", 0.0), ("6?3", "6", 0.0)],  # math-verify: 6
)  # fmt: skip
def test_math_answers_are_judged_by_equivalence(answer, gold, expected):
    assert score(answer, gold) == expected


@pytest.mark.parametrize("answer, gold", [("386", "386"), ("+386", "386"), ("0386", "386"), ("-5", "5"),
                                          ("-5", "-5"), ("391", "386"), ("12345678901", "12345678901")])  # fmt: skip
def test_integer_shortcut_agrees_with_math_verify(answer, gold):
    assert score(answer, gold) == float(verify(parse(f"${gold}$"), parse(f"${answer}$")))


def test_short_answers_exact_match_and_f1_against_hand_computed_values():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert judge("the Eiffel Tower.", "Eiffel Tower", "short") == (1.0, 1.0)
    # said {cat, sat}, wanted {cat, sat, down}: precision 1, recall 2/3, F1 0.8
    correct, f1 = judge("the cat sat", "a cat sat down", "short")
    assert correct == 0.0 and f1 == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0 and token_f1("the", "a") == 1.0  # both empty after normalising
    assert judge(None, "Paris", "short") == (0.0, 0.0)
    assert judge("14", "14", "math") == (1.0, None)  # F1 is a short-answer fact only


def test_bad_answer_formats_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="needs a group"):
        PromptTask(prompt_id="a", problem="q", answer="x", answer_pattern="####")
    with pytest.raises(ValueError, match="not a regular expression"):
        Problem("a", "q", "x", 0, "short", "(")
    with pytest.raises(ValueError, match="answer_kind"):
        Problem("a", "q", "x", 0, "essay")


async def test_an_episode_records_exact_match_and_f1_for_a_short_answer_task(world_dir):
    tokenizer = load_model(world_dir / "policy")[1]
    task = PromptTask(prompt_id="qa", problem="Capital of France?", answer="Paris", answer_kind="short",
                      answer_pattern="Answer: (.+)")  # fmt: skip
    engine = ScriptedEngine(tokenizer, ["Answer: paris, France<eos>"])
    traj = await run_episode(engine, None, task, anneal(1.0), RolloutConfig(), 0)
    # said {paris, france}, wanted {paris}: precision 1/2, recall 1, F1 2/3; not an exact match
    assert traj.final_answer == "paris, France" and traj.finish == "answer"
    assert traj.score == 0.0 and traj.f1 == pytest.approx(2 / 3)


def test_the_learners_step_metrics_average_f1_over_short_answer_samples_only():
    from test_codec import make_group

    group = make_group(n_samples=3)
    short = group.model_copy(update={"samples": [s.model_copy(update={"f1": f1}) for s, f1 in
                                                 zip(group.samples, (1.0, 0.5, 0.0), strict=True)]})  # fmt: skip
    assert rollout_stats([short], learner_version=4)["f1"] == pytest.approx(0.5)
    assert "f1" not in rollout_stats([group], learner_version=4)  # math answers have no F1


@pytest.mark.parametrize(
    "text, holds",
    [
        ("7*8=56 3*9=27 56-27=29 29+6=35 \\boxed{35}", True),
        ("4-7=-3 -3+5=2 \\boxed{2}", True),  # negative results and operands
        ("2+3*4=14", True),  # precedence
        ("2+3*4=20", False),
        ("4-7=-4 -4+5=1 \\boxed{2}", False),  # a box below a chain that does not lead to it
        ("6*7=42 42+1=44 \\boxed{43}", False),  # one wrong step of two
        ("\\boxed{35}", None),  # no equation written
        ("4#5=47 \\boxed{47}", None),  # a table lookup is no arithmetic
        ("4#5+3=50", None),  # nor the arithmetic tail of one
        ("x=2+3=9", None),
        ("2+3=5.5", None),
        ("010-9=1 \\boxed{1}", True),  # leading zeros, as sampled text may write them
        ("007*2=15", False),
        ("7*8=55.", False),  # a sentence's full stop ends it
        ("7*8=50+6", None),  # a right side that goes on is not judged
        ("6*7=42=42", None),
    ],
)
def test_work_holds_judges_every_written_integer_equation(text, holds):
    assert work_holds(text) is holds
