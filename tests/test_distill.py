"""learner.distill: which episodes are trained again without the expert, and exactly what that sample holds."""

import numpy as np
import pytest

from eapo.dev.world.sft import build_tokenizer
from learner.distill import distilled_sample, distilled_samples
from proto import AnnealState, ConsultRecord, PromptTask, Trajectory, TrajectoryGroup
from proto import episode_format as fmt

TOK = build_tokenizer()
PROBLEM, SOLUTION = "7*8", "7*8=56 \\boxed{56}"


def episode(queries: list[str], shown: list[bool], score: float = 1.0, answer: str = SOLUTION) -> Trajectory:
    """The training prompt, then per query a consult block (policy) and its expert block (injected; the
    solver's answer when ``shown``, else "unavailable"), then the policy's ``answer``."""
    ids, consults = TOK.encode(fmt.training_prompt(PROBLEM)), []
    mask = [False] * len(ids)

    def add(text: str, policy: bool) -> tuple[int, int]:
        start, new = len(ids), TOK.encode(text)
        ids.extend(new)
        mask.extend([policy] * len(new))
        return start, len(ids)

    prompt_len = len(ids)
    for query, accepted in zip(queries, shown, strict=True):
        add(fmt.consult_block([query]), policy=True)
        start, end = add(fmt.expert_block(SOLUTION if accepted else None), policy=False)
        outcome = "answer" if accepted else "not_asked"
        consults.append(
            ConsultRecord(
                turn=len(consults),
                query=query,
                outcome=outcome,
                draw=0.1 if accepted else 0.9,
                accepted=accepted,
                injected_start=start,
                injected_end=end,
            )
        )
    add(answer + fmt.EOS, policy=True)
    return Trajectory(
        sample_index=0,
        token_ids=np.array(ids, np.int32),
        loss_mask=np.array(mask, bool),
        behaviour_logprobs=np.where(mask, -0.5, 0.0).astype(np.float32),
        prompt_len=prompt_len,
        turns=[],
        consults=consults,
        score=score,
        finish="answer",
        seed=0,
    )


def test_a_right_direct_consultation_is_trained_again_after_the_prompt_alone():
    sample = distilled_sample(episode([PROBLEM], [True]), PROBLEM, advantage=0.75)
    assert sample is not None
    # exactly the training prompt and the policy's own answer: the consult and the expert's answer cut out
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + SOLUTION + fmt.EOS
    prompt_len = len(TOK.encode(fmt.training_prompt(PROBLEM)))
    assert not sample.mask[:prompt_len].any() and sample.mask[prompt_len:].all()
    assert sample.behaviour is None and sample.advantage == 0.75  # on-policy, the episode's own credit


def test_after_two_shown_answers_only_the_answer_after_the_last_block_is_kept():
    sample = distilled_sample(episode([PROBLEM, PROBLEM], [True, True]), PROBLEM, advantage=1.0)
    assert TOK.decode(sample.ids.tolist()) == fmt.training_prompt(PROBLEM) + SOLUTION + fmt.EOS


@pytest.mark.parametrize(
    ("why", "trajectory", "advantage"),
    [
        ("wrong", episode([PROBLEM], [True], score=0.0, answer="7*8=54 \\boxed{54}"), 0.5),
        ("credited down", episode([PROBLEM], [True]), -0.5),
        ("no credit", episode([PROBLEM], [True]), 0.0),
        ("alone", episode([], []), 1.0),
        ("decomposition", episode(["7+8"], [True]), 1.0),
        ("nothing shown", episode([PROBLEM], [False]), 1.0),
        ("last block unanswered", episode([PROBLEM, PROBLEM], [True, False]), 1.0),
    ],
)
def test_nothing_is_distilled_without_a_right_answer_following_a_shown_one(why, trajectory, advantage):
    assert distilled_sample(trajectory, PROBLEM, advantage) is None, why


def test_a_group_distils_its_qualifying_samples_in_order():
    samples = [episode([PROBLEM], [True]), episode([], []), episode([PROBLEM, PROBLEM], [True, True])]
    group = TrajectoryGroup(
        group_id="g",
        prompt=PromptTask(prompt_id="p", problem=PROBLEM, answer="56"),
        anneal=AnnealState(step=0, acceptance=1, budget=2, penalty=0),
        samples=samples,
        rollout_replica="r",
        created_at=0,
    )
    out = distilled_samples(group, [0.5, 0.5, 0.25])
    assert [s.advantage for s in out] == [0.5, 0.25]
