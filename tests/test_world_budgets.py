"""The rollout's default token budgets hold the tiny world's answers whole. At 40 expert tokens (the
default before) the solver's worked solution lost its ``\\boxed{}`` in two of three tier-4 answers."""

from eapo.core.config import RolloutConfig, WorldConfig
from eapo.dev.world.sft import build_tokenizer
from eapo.dev.world.tasks import make_split, worked_solution
from proto import episode_format as fmt


def test_the_default_budgets_hold_every_worked_solution_and_the_longest_consult_episode():
    cfg, world, tok = RolloutConfig(), WorldConfig(), build_tokenizer()
    problems = make_split(world.seed, world.train_problems, "train")
    problems += make_split(world.seed, world.eval_problems, "eval")
    length = lambda text: len(tok.encode(text))  # noqa: E731
    answers = {p.problem: worked_solution(p.problem) for p in problems}
    longest = max(answers, key=lambda problem: length(answers[problem]))
    assert length(answers[longest] + fmt.EOS) == 54  # 2-6*8*7*7: the figure in the config's description
    assert length(answers[longest] + fmt.EOS) <= cfg.expert_max_tokens
    # K direct queries of the longest problem, K whole answers, the solution re-derived: within the context.
    episode = (
        fmt.training_prompt(longest)
        + fmt.consult_block([longest] * cfg.max_queries)
        + fmt.expert_block(answers[longest]) * cfg.max_queries
        + answers[longest]
        + fmt.EOS
    )
    assert length(episode) <= cfg.max_context
