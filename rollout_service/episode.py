"""One EAPO episode: the multi-turn loop of policy turns, consult blocks and injected expert answers.

Each query's answer is shown to the policy only if the episode's seeded draw ``u < p(t)``, and only those
queries are sent to an expert: an answer the draw withholds would cost an expert's compute and change
nothing the policy sees. The draw and the decision are recorded either way. The sequence itself (ids,
loss mask, log-probs) is the ``Transcript``'s; who answers a query is ``expert_client``'s.

Any tokenizer: prompts come from the policy's own chat template (``proto.episode_format``), a consult
turn ends on the closing tag as a stop *string* (``eapo.inference.sampling``: under BPE the tag is several tokens,
and its last may run past it), and expert blocks continue the same assistant turn as plain text.
"""

from __future__ import annotations

import hashlib
import random

from eapo.core.config import RolloutConfig
from eapo.core.metrics import labelled
from eapo.inference.sampling import SampleRequest
from proto import AnnealState, ConsultRecord, ConsultResult, PromptTask, Trajectory
from proto import episode_format as fmt
from rollout_service.consult import parse_consult
from rollout_service.engine import PolicyEngine
from rollout_service.expert_client import Experts
from rollout_service.metrics import CONSULTS, EPISODES, PARSE_ISSUES
from rollout_service.reward import extract_answer, judge, work_holds
from rollout_service.transcript import Transcript


def episode_seed(base: int, prompt_id: str, sample_index: int) -> int:
    """Stable across processes and replicas (unlike ``hash``), so an episode can be replayed."""
    digest = hashlib.sha256(f"{base}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


async def run_episode(
    engine: PolicyEngine,
    experts: Experts | None,
    task: PromptTask,
    anneal: AnnealState,
    cfg: RolloutConfig,
    sample_index: int,
) -> Trajectory:
    """Roll out one episode. ``experts=None`` means the consult action is not granted (eval prompt).

    The action is offered only where its answers can be read: at B(t) = 1 the episode is a plain answer
    under the evaluation prompt, and in the last turn of a larger budget a consult block does not end the
    turn (no expert is called; the policy's text goes on and is judged as written).
    """
    seed = episode_seed(cfg.seed, task.prompt_id, sample_index)
    rng = random.Random(seed)
    if anneal.budget < 2:
        experts = None
    transcript = Transcript.for_prompt(engine.tokenizer, task.problem, cfg.max_queries if experts else None)
    consults: list[ConsultRecord] = []
    rejected_blocks = 0
    finish = "budget"
    for turn in range(anneal.budget):
        may_consult = experts is not None and turn < anneal.budget - 1
        room = cfg.max_context - len(transcript)
        if room <= 0:
            finish = "context"
            break
        result, version = await engine.sample(
            SampleRequest(
                prompt_ids=list(transcript.ids),
                max_new_tokens=min(cfg.max_new_tokens, room),
                stop_ids=frozenset({engine.tokenizer.eos_token_id}),
                stop_strings=(fmt.CONSULT_CLOSE,) if may_consult else (),
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=rng.getrandbits(63),
            )
        )
        if may_consult and result.stop_string == fmt.CONSULT_CLOSE:
            block = transcript.add_turn(result, version, "consult")
            parsed = parse_consult(transcript.text(block), cfg.max_queries)
            for issue in parsed.issues:
                labelled(PARSE_ISSUES, issue).inc()
            if not parsed.queries:
                rejected_blocks += 1
                transcript.inject(fmt.expert_block(None))
                continue
            draws = [rng.random() for _ in parsed.queries]
            asked = [i for i, draw in enumerate(draws) if draw < anneal.acceptance]
            episode_id = f"{task.prompt_id}/{sample_index}"
            answers = await experts.consult([parsed.queries[i] for i in asked], episode_id, asked) if asked else []
            shown = dict(zip(asked, answers, strict=True))
            for i, (query, draw) in enumerate(zip(parsed.queries, draws, strict=True)):
                consults.append(_show(transcript, query, shown.get(i), draw))
            continue
        # a turn cut at the room left ran into the context limit, not the turn limit
        finish = "eos" if result.finish == "stop" else ("context" if len(result.token_ids) >= room else "length")
        transcript.add_turn(result, version, finish)
        break
    last = transcript.turns[-1] if transcript.turns else None
    answer, work = None, None
    if last is not None and last.finish != "consult":
        text = transcript.text(last, skip_special_tokens=True)
        answer, work = extract_answer(text, task.answer_pattern), work_holds(text)
    if answer is not None and finish == "eos":
        finish = "answer"
    correct, f1 = judge(answer, task.answer, task.answer_kind)
    labelled(EPISODES, finish).inc()
    token_ids, loss_mask, behaviour_logprobs = transcript.arrays()
    return Trajectory(
        sample_index=sample_index,
        token_ids=token_ids,
        loss_mask=loss_mask,
        behaviour_logprobs=behaviour_logprobs,
        prompt_len=transcript.prompt_len,
        turns=transcript.turns,
        consults=consults,
        rejected_blocks=rejected_blocks,
        final_answer=answer,
        score=correct,
        f1=f1,
        work_holds=work,
        finish=finish,
        seed=seed,
    )


def _show(transcript: Transcript, query: str, res: ConsultResult | None, draw: float) -> ConsultRecord:
    """Injects the expert's answer if one was asked for (``res``) and came, else the unavailable note,
    and records which."""
    outcome = "not_asked" if res is None else ("answer" if res.answer is not None else "error")
    accepted = res is not None and res.answer is not None
    start, end = transcript.inject(fmt.expert_block(res.answer if accepted else None))
    labelled(CONSULTS, outcome, str(accepted)).inc()
    return ConsultRecord(
        turn=len(transcript.turns) - 1,
        query=query,
        outcome=outcome,
        draw=draw,
        accepted=accepted,
        injected_start=start,
        injected_end=end,
        detail="" if res is None else (res.answer if res.answer is not None else res.error or ""),
    )
