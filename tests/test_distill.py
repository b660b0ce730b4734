"""learner.distill: which episodes are trained again without the expert, and exactly what that sample holds."""

import numpy as np
import pytest

from eapo.core.config import LearnerConfig
from eapo.dev.world.sft import build_tokenizer
from learner.distill import distilled_sample, distilled_samples
from proto import AnnealState, ConsultRecord, PromptTask, Trajectory, TrajectoryGroup, TurnRecord
from proto import episode_format as fmt
from proto.schemas import DETAIL_CHARS

TOK = build_tokenizer()
PROBLEM, SOLUTION = "7*8", "7*8=56 \\boxed{56}"
UNEXECUTED = fmt.consult_block([PROBLEM])


def episode(
    blocks: list[list[str]],
    shown: list[bool],
    score: float = 1.0,
    answer: str = SOLUTION,
    malformed: bool = False,
    expert_answers: list[str] | None = None,
    ending: str | None = fmt.EOS,
) -> Trajectory:
    """As the rollout writes it: the training prompt, then per block a consult turn (policy) and one expert
    block per query (injected: the next of ``expert_answers``, default the solver's, where ``shown``, else
    "unavailable"), then, if ``malformed``, a block without queries answered "unavailable", then the answer
    turn, stopped on ``ending`` (None: cut at the length limit)."""
    ids, consults, turns = TOK.encode(fmt.training_prompt(PROBLEM)), [], []
    mask = [False] * len(ids)

    def add(text: str, policy: bool) -> tuple[int, int]:
        start, new = len(ids), TOK.encode(text)
        ids.extend(new)
        mask.extend([policy] * len(new))
        return start, len(ids)

    def turn(text: str, finish: str) -> None:
        start, end = add(text, policy=True)
        turns.append(TurnRecord(start=start, end=end, policy_version=0, finish=finish))

    prompt_len, answers, texts = len(ids), iter(shown), iter(expert_answers or [SOLUTION] * len(shown))
    for block in blocks:
        turn(fmt.consult_block(block), "consult")
        for query in block:
            accepted, text = next(answers), next(texts)
            start, end = add(fmt.expert_block(text if accepted else None), policy=False)
            outcome = "answer" if accepted else "not_asked"
            record = dict(query=query, outcome=outcome, draw=0.1 if accepted else 0.9, accepted=accepted)
            record["detail"] = text if accepted else ""  # the record cuts it short, as on the stream
            consults.append(ConsultRecord(turn=len(turns) - 1, injected_start=start, injected_end=end, **record))
    if malformed:
        turn(fmt.CONSULT_OPEN + fmt.CONSULT_CLOSE, "consult")
        add(fmt.expert_block(None), policy=False)
    turn(answer + (ending or ""), "eos" if ending else "length")
    return Trajectory(
        sample_index=0,
        token_ids=np.array(ids, np.int32),
        loss_mask=np.array(mask, bool),
        behaviour_logprobs=np.where(mask, -0.5, 0.0).astype(np.float32),
        prompt_len=prompt_len,
        turns=turns,
        consults=consults,
        rejected_blocks=int(malformed),
        score=score,
        final_answer=fmt.extract_boxed(answer),
        finish="answer",
        seed=0,
    )


def group_of(samples: list[Trajectory]) -> TrajectoryGroup:
    return TrajectoryGroup(
        group_id="g",
        prompt=PromptTask(prompt_id="p", problem=PROBLEM, answer="56"),
        anneal=AnnealState(step=0, acceptance=1, budget=3, penalty=0),
        samples=samples,
        rollout_replica="r",
        created_at=0,
    )


def test_a_right_direct_consultation_is_trained_again_after_the_prompt_alone():
    sample = distilled_sample(episode([[PROBLEM]], [True]), PROBLEM, advantage=0.75, tok=TOK)
    assert sample is not None
    # exactly the training prompt and the policy's own answer: the consult and the expert's answer cut out
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + SOLUTION + fmt.EOS
    prompt_len = len(TOK.encode(fmt.training_prompt(PROBLEM)))
    assert not sample.mask[:prompt_len].any() and sample.mask[prompt_len:].all()
    assert sample.behaviour is None and sample.advantage == 0.75  # on-policy, the episode's own credit


@pytest.mark.parametrize(
    ("blocks", "shown"),
    [([[PROBLEM], [PROBLEM]], [True, True]), ([[PROBLEM, PROBLEM]], [False, True]), ([[PROBLEM]] * 2, [False, True])],
)
def test_after_several_queries_only_the_answer_after_the_last_one_is_kept(blocks, shown):
    sample = distilled_sample(episode(blocks, shown), PROBLEM, advantage=1.0, tok=TOK)
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + SOLUTION + fmt.EOS


@pytest.mark.parametrize(
    ("why", "trajectory", "advantage"),
    [
        ("wrong", episode([[PROBLEM]], [True], score=0.0, answer="7*8=54 \\boxed{54}"), 0.5),
        ("credited down", episode([[PROBLEM]], [True]), -0.5),
        ("no credit", episode([[PROBLEM]], [True]), 0.0),
        ("alone", episode([], []), 1.0),
        ("decomposition", episode([["7+8"]], [True]), 1.0),
        ("nothing shown", episode([[PROBLEM]], [False]), 1.0),
        ("the last query unanswered", episode([[PROBLEM, PROBLEM]], [True, False]), 1.0),
        ("a malformed block after the answer", episode([[PROBLEM]], [True], malformed=True), 1.0),
        # in the budget's last turn a consult block is not executed: it stays in the answer's text
        ("a consult block in the answer", episode([[PROBLEM]], [True], answer=UNEXECUTED + SOLUTION), 1.0),
        # an expert block the policy wrote itself: trained after the prompt alone, it would teach faking one
        ("a written expert block", episode([[PROBLEM]], [True], answer=fmt.expert_block("7*8=9") + SOLUTION), 1.0),
    ],
)
def test_nothing_is_distilled_but_a_right_answer_straight_after_a_shown_one(why, trajectory, advantage):
    assert distilled_sample(trajectory, PROBLEM, advantage, TOK) is None, why


def test_a_group_distils_its_qualifying_samples_in_order():
    samples = [episode([[PROBLEM]], [True]), episode([], []), episode([[PROBLEM], [PROBLEM]], [True, True])]

    group = group_of(samples)
    out = distilled_samples(group, [0.5, 0.5, 0.25], TOK, LearnerConfig(internalize=True))
    assert [s.advantage for s in out] == [0.5, 0.25]
    expected = [distilled_sample(samples[i], PROBLEM, a, TOK) for i, a in ((0, 0.5), (2, 0.25))]
    assert [s.ids.tolist() for s in out] == [s.ids.tolist() for s in expected]
    # learner.internalize_weight scales the distilled samples' credit, and only theirs
    heavy = LearnerConfig(internalize=True, internalize_weight=8.0)
    weighted = distilled_samples(group, [0.5, 0.5, 0.25], TOK, heavy)
    assert [s.advantage for s in weighted] == [4.0, 2.0]
    assert [s.ids.tolist() for s in weighted] == [s.ids.tolist() for s in out]


def test_with_check_work_a_right_answer_below_wrong_work_is_not_distilled():
    # the box copied below a wrong step: right by the score, unrewarded under check_work, whatever its
    # advantage (a consult penalty alone can make one positive)
    copied = episode([[PROBLEM]], [True], answer="7*8=54 \\boxed{56}")
    copied.work_holds = False
    assert distilled_sample(copied, PROBLEM, 0.05, TOK) is not None
    assert distilled_sample(copied, PROBLEM, 0.05, TOK, check_work=True) is None
    lc = LearnerConfig(internalize=True, check_work=True)
    assert distilled_samples(group_of([copied]), [0.05], TOK, lc) == []  # the config reaches the gate


def test_the_evaluation_prompt_replaces_the_training_prompt_when_asked():
    group = group_of([episode([[PROBLEM]], [True])])
    lc = LearnerConfig(internalize=True, internalize_prompt="evaluation")
    (sample,) = distilled_samples(group, [1.0], TOK, lc)
    # the prompt the policy is judged alone on, under its own chat template, with no consult instruction
    assert TOK.decode(sample.ids.tolist()) == fmt.eval_prompt(PROBLEM) + SOLUTION + fmt.EOS
    prompt_len = len(TOK.encode(fmt.eval_prompt(PROBLEM)))
    assert not sample.mask[:prompt_len].any() and sample.mask[prompt_len:].all()
    assert sample.mask.sum() == len(TOK.encode(SOLUTION + fmt.EOS))


# a right final answer below a chain that is wrong: the reward judges the box only
COPIED_BOX = "7*8=54 \\boxed{56}"


def test_the_expert_source_trains_the_shown_answer_that_agrees_with_the_policys():
    # two answers shown for the last block, the first one wrong: the agreeing one is trained, not the
    # policy's own chain (which copied the box below a wrong step)
    wrong = "7*8=54 \\boxed{54}"
    trajectory = episode([[PROBLEM, PROBLEM]], [True, True], answer=COPIED_BOX, expert_answers=[wrong, SOLUTION])
    lc = LearnerConfig(internalize=True, internalize_prompt="evaluation", internalize_source="expert")
    (sample,) = distilled_samples(group_of([trajectory]), [0.5], TOK, lc)
    assert TOK.decode(sample.ids.tolist()) == fmt.eval_prompt(PROBLEM) + SOLUTION + fmt.EOS
    prompt_len = len(TOK.encode(fmt.eval_prompt(PROBLEM)))
    assert not sample.mask[:prompt_len].any() and sample.mask[prompt_len:].all()
    assert sample.behaviour is None and sample.advantage == 0.5
    # the policy source keeps the policy's own text, whatever its chain
    (own,) = distilled_samples(
        group_of([trajectory]), [0.5], TOK, lc.model_copy(update={"internalize_source": "policy"})
    )
    assert TOK.decode(own.ids.tolist()) == fmt.eval_prompt(PROBLEM) + COPIED_BOX + fmt.EOS


@pytest.mark.parametrize(
    ("why", "expert_answers", "shown"),
    [
        ("no shown answer agrees", ["7*8=54 \\boxed{54}"], [True]),
        ("the agreeing answer was cut before its box", ["7*8=56"], [True]),
    ],
)
def test_the_expert_source_distils_nothing_without_an_agreeing_shown_answer(why, expert_answers, shown):
    trajectory = episode([[PROBLEM]], shown, expert_answers=expert_answers)
    assert distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="expert") is None, why


@pytest.mark.parametrize(
    ("shown_answers", "trained"),
    [
        ([SOLUTION, "7*8=54 \\boxed{54}"], SOLUTION),  # the agreeing one, wherever it is in the block
        (["8*7=56 \\boxed{56}", SOLUTION], "8*7=56 \\boxed{56}"),  # two agree: the first
        (["7*8=54 \\boxed{54}", "7*8=56 \\boxed{ 56 }"], "7*8=56 \\boxed{ 56 }"),  # the box read as the reward reads it
    ],
)
def test_the_expert_source_takes_the_first_agreeing_answer_of_the_block(shown_answers, trained):
    trajectory = episode([[PROBLEM, PROBLEM]], [True, True], expert_answers=shown_answers)
    sample = distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="expert")
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + trained + fmt.EOS


def test_the_expert_source_reads_the_answer_as_shown_not_the_records_cut_copy():
    # an answer longer than what ConsultRecord.detail keeps, its box past the cut
    long = "7*8=56 " * 150 + "\\boxed{56}"
    trajectory = episode([[PROBLEM]], [True], expert_answers=[long])
    assert len(long) > DETAIL_CHARS and trajectory.consults[0].detail == long[:DETAIL_CHARS]
    sample = distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="expert")
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + long + fmt.EOS


@pytest.mark.parametrize(
    ("ending", "closing"),
    [(fmt.PAD, fmt.PAD), (None, fmt.EOS)],  # the policy's own stop token; a turn cut at the limit: EOS
)
def test_the_expert_answer_ends_as_the_policys_turn_did(ending, closing):
    trajectory = episode([[PROBLEM]], [True], ending=ending)
    sample = distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="expert")
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + SOLUTION + closing


def test_the_expert_source_never_trains_an_answer_holding_a_block():
    shown = fmt.expert_block("7*8=9") + SOLUTION
    trajectory = episode([[PROBLEM]], [True], expert_answers=[shown])
    assert distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="expert") is None


def test_the_expert_source_reads_only_the_last_block():
    # the first block's answer agrees, the last block's does not: nothing, as the policy answered after the last
    trajectory = episode([[PROBLEM], [PROBLEM]], [True, True], expert_answers=[SOLUTION, "7*8=54 \\boxed{54}"])
    assert distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="expert") is None
    assert distilled_sample(trajectory, PROBLEM, 1.0, TOK, source="policy") is not None
