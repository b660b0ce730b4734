"""The learner's prompt feeder against a real Redis: one seeded order, epoch after epoch, up to the limit."""

import numpy as np
import pytest
from helpers import group

from eapo.core.data import Problem
from learner.feeder import PromptFeeder
from proto import Names, PromptTask, decode
from proto.streams import FIELD


async def test_admits_up_to_the_limit_in_the_seeded_order_epoch_after_epoch(redis_client, prefix):
    names = Names(prefix)
    problems = [Problem(id=f"q{i}", problem=f"{i}+1", answer=str(i + 1), tier=0) for i in range(3)]
    feeder = PromptFeeder(redis_client, names, problems, seed=7, batch_groups=2, max_staleness=1)
    await feeder.fill(step=0, dropped=0)  # (0 + 1 + 1) · 2 = 4
    await feeder.fill(step=0, dropped=0)  # nothing more
    await feeder.fill(step=1, dropped=1)  # (1 + 1 + 1) · 2 + 1 = 7
    tasks = [decode(fields[FIELD], PromptTask) for _, fields in await redis_client.xrange(names.prompts)]
    # Random(7) shuffles [0, 1, 2] to [2, 0, 1]: pinned, so a refactor cannot change a seed's prompt order.
    assert [(t.prompt_id, t.admitted_at_step) for t in tasks] == [
        ("q2@0", 0),
        ("q0@0", 0),
        ("q1@0", 0),
        ("q2@1", 0),
        ("q0@1", 1),
        ("q1@1", 1),
        ("q2@2", 1),
    ]
    assert int(await redis_client.hget(names.counters, "admitted")) == 7


def problems(n: int) -> list[Problem]:
    return [Problem(id=f"q{i}", problem=f"{i}+1", answer=str(i + 1), tier=0) for i in range(n)]


def outcome(problem_id: str, epoch: int, scores: list[float]):
    g = group(np.random.default_rng(0), scores)
    g.prompt = g.prompt.model_copy(update={"prompt_id": f"{problem_id}@{epoch}"})
    return g


async def test_skip_rate_follows_greso_admission_probability(redis_client, prefix):
    """Admitted with probability max(explore^z, 0.01) after a streak of z signal-free groups: hand-computed
    0.25 at explore 0.5, z = 2, and the floor 0.01 at z = 20 (a problem is never out for good)."""
    feeder = PromptFeeder(redis_client, Names(prefix), problems(1), 3, 1, 0, skip_explore=0.5)
    assert not any(feeder.skips("q0", e) for e in range(100))  # no history: always admitted
    for streak, admitted in ((1, 0.5), (2, 0.25), (20, 0.01)):
        feeder.streaks["q0"] = streak
        rate = sum(not feeder.skips("q0", e) for e in range(20_000)) / 20_000
        assert rate == pytest.approx(admitted, abs=0.15 * admitted), streak
    feeder.skip_explore = None  # off: plain dynamic sampling, every problem admitted
    assert not any(feeder.skips("q0", e) for e in range(100))


async def test_a_streak_grows_on_signal_free_groups_and_restarts_on_signal(redis_client, prefix):
    names = Names(prefix)
    feeder = PromptFeeder(redis_client, names, problems(2), 3, 1, 0, skip_explore=0.5)
    assert feeder.observe(outcome("q0", 0, [0, 0, 0, 0])) == {"q0": 1}  # all wrong
    assert feeder.observe(outcome("q0", 1, [1, 1, 1, 1])) == {"q0": 2}  # all right: still no signal
    assert feeder.observe(outcome("q1", 0, [1, 0, 0, 0])) == {"q1": 0}
    assert feeder.streaks == {"q0": 2, "q1": 0}
    assert feeder.observe(outcome("q0", 2, [0, 1, 0, 0])) == {"q0": 0}  # signal again: the streak restarts
    assert feeder.streaks == {"q0": 0, "q1": 0}
    feeder.skip_explore = None  # off: nothing recorded, nothing to save
    assert feeder.observe(outcome("q1", 1, [0, 0, 0, 0])) == {} and feeder.streaks["q1"] == 0


async def test_with_check_work_a_streak_counts_the_signal_as_rewarded(redis_client, prefix):
    # both right, one below written work that does not hold: no signal by score, signal as rewarded
    right_unworked = outcome("q0", 0, [1, 1])
    right_unworked.samples[1].work_holds = False
    plain = PromptFeeder(redis_client, Names(prefix), problems(1), 3, 1, 0, skip_explore=0.5)
    checking = PromptFeeder(redis_client, Names(prefix), problems(1), 3, 1, 0, skip_explore=0.5, check_work=True)
    assert plain.observe(right_unworked) == {"q0": 1} and checking.observe(right_unworked) == {"q0": 0}


async def test_skipped_prompts_are_counted_and_a_resumed_feeder_walks_on_alike(redis_client, prefix):
    names = Names(prefix)
    feeder = PromptFeeder(redis_client, names, problems(4), 7, 2, 0, skip_explore=0.5)
    for problem in ("q0", "q1", "q2"):  # three of four problems with long signal-free streaks
        for epoch in range(6):
            await redis_client.hset(names.prompt_streaks, mapping=feeder.observe(outcome(problem, epoch, [0, 0])))
    await feeder.fill(step=9, dropped=0)  # 20 admitted
    counters = {k.decode(): int(v) for k, v in (await redis_client.hgetall(names.counters)).items()}
    assert counters["admitted"] == 20 and counters["position"] == counters["admitted"] + counters["skipped"]
    ids = [decode(f[FIELD], PromptTask).prompt_id for _, f in await redis_client.xrange(names.prompts)]
    assert len(ids) == 20 and counters["skipped"] > 20  # at 0.5^6 ≈ 0.016, mostly q3 gets through
    assert sum(i.startswith("q3@") for i in ids) > 15

    resumed = PromptFeeder(redis_client, names, problems(4), 7, 2, 0, skip_explore=0.5)
    await resumed.restore(counters)
    walks = []
    for f in (feeder, resumed):  # the uninterrupted feeder admits ten more, and the resumed one the same ten
        await redis_client.delete(names.prompts)
        await f.fill(step=14, dropped=0)
        ids = [decode(e[FIELD], PromptTask).prompt_id for _, e in await redis_client.xrange(names.prompts)]
        walks.append((ids, f.admitted, f.position, f.skipped))
    assert walks[0] == walks[1] and len(walks[0][0]) == 10
