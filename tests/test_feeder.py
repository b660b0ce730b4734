"""The learner's prompt feeder against a real Redis: one seeded order, epoch after epoch, up to the limit."""

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
