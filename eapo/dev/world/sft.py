"""The tiny world's models: the character-level tokenizer, each model's SFT curriculum, and SFT itself.

Torch and transformers live here and not in ``bootstrap``: ``eapo up`` and ``eapo experiment`` check the
world on every start, and only a build (in spawned worker processes) needs them.

The policy is small and briefly trained on a mixture of the three paradigms (self-resolution,
direct consultation, decomposition) plus traces where the expert was unavailable. The experts are
heterogeneous: the solver is larger and trained on worked solutions of whole problems; the
calculator is trained on single operations only (the sub-queries of a decomposition), so it is
nearly exact there and of no use on a whole problem.
"""

from __future__ import annotations

import functools
import logging
import random
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from eapo.core.config import ModelSpec, Tasks, WorldConfig
from eapo.dev.world.bootstrap import CHAT_TEMPLATE
from eapo.dev.world.tasks import (
    LOOKUP,
    TIERS,
    lookup_table,
    make_problem,
    needs_any,
    solution_steps,
    unseen_facts,
    worked_solution,
)
from expert_gateway.degrade import withhold_result
from proto import episode_format as fmt

log = logging.getLogger(__name__)

Sample = tuple[str, str]  # (prompt, completion): loss on the completion only
HEAD_DIM = 32  # vLLM's CPU attention serves 32, 64, 80, 96, 112, 128, …


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level: every printable ASCII character is a token, plus the episode's special tokens.

    Byte-level, as Qwen2's own tokenizer is: ``AutoTokenizer`` (and so vLLM) loads a ``qwen2`` checkpoint
    with Qwen2's pipeline (byte-level pre-tokenizer and decoder) whatever ``tokenizer.json`` says, and a
    plain character vocabulary then loses its spaces and newlines. With each character stored as its
    byte-level symbol (space as ``Ġ``) and no merges, both pipelines give the same ids and text."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    symbols = [byte_level.pre_tokenize_str(c)[0][0] for c in chars]
    vocab = {tok: i for i, tok in enumerate(fmt.SPECIAL_TOKENS + symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(fmt.SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=fmt.EOS, pad_token=fmt.PAD)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def solver_sample(rng: random.Random, tasks: Tasks = "arithmetic") -> Sample:
    """The solver expert: worked solutions of whole problems, every tier."""
    expr = make_problem(rng, rng.choice(TIERS), 0, "sft", tasks).problem
    return fmt.eval_prompt(expr), worked_solution(expr) + fmt.EOS


def calculator_sample(rng: random.Random, tasks: Tasks = "arithmetic") -> Sample:
    """The calculator expert: single operations, as they occur inside solutions (decomposition
    sub-queries, multi-digit intermediate results included) — exact there, lost on whole problems."""
    steps = solution_steps(make_problem(rng, rng.choice(TIERS), 0, "sft", tasks).problem)
    expr = rng.choice(steps)[0]
    return fmt.eval_prompt(expr), worked_solution(expr) + fmt.EOS


def policy_sample(
    rng: random.Random,
    max_queries: int = 3,
    withheld_share: float = 0.0,
    unseen: frozenset[str] = frozenset(),
    tasks: Tasks = "arithmetic",
    copied_share: float = 0.0,
) -> Sample:
    """One trace of the policy's training mixture (see module docstring). ``withheld_share`` of the direct
    consultations show the expert's answer cut just before its result (``withhold_result``), the policy
    then writing the whole solution: a policy that saw only boxed expert answers continues a boxless one
    as if it were still the expert's. That draw is seeded by the trace itself, so ``rng`` draws as in the
    plain mixture and every other trace is the same. A problem one of whose steps is in ``unseen`` is drawn
    again (with its tier, so the tiers are no longer equally drawn: about 31, 27, 23 and 19% with half the
    arithmetic facts unseen): the policy never sees those facts, in its own tokens or in an expert's.
    ``copied_share`` of the direct consultations of a problem with a ``#`` show the expert's solution on a
    table of its own (drawn per trace, like ``withheld_share``), and the policy writes that solution:
    re-deriving only ever agrees with what it knows, so without these it never learns to take from an answer
    what it does not know. Not with ``withheld_share``: a withheld answer shows no value to take."""
    if withheld_share and copied_share:
        raise ValueError("policy_sample: withheld_share and copied_share exclude each other")
    p = make_problem(rng, rng.choice(TIERS), 0, "sft", tasks)
    while unseen and needs_any(p.problem, unseen):
        p = make_problem(rng, rng.choice(TIERS), 0, "sft", tasks)
    expr, answer = p.problem, p.answer
    if rng.random() < 0.25:  # evaluation mode: answer alone
        return fmt.eval_prompt(expr), worked_solution(expr) + fmt.EOS
    prompt, r = fmt.training_prompt(expr), rng.random()
    if r < 0.35:  # self-resolution
        body = worked_solution(expr)
    elif r < 0.6:  # direct consultation, the same question to 1..K experts, then re-derived in its own tokens
        k, solution = rng.randint(1, max_queries), worked_solution(expr)
        query = fmt.consult_block([expr] * k)
        if copied_share and LOOKUP in expr:  # seeded by the plain trace, like the withheld draw below
            plain = f"copied:{query}{fmt.expert_block(solution) * k}{solution}{fmt.EOS}"
            copied = random.Random(zlib.crc32(plain.encode()))
            if copied.random() < copied_share:
                solution = worked_solution(expr, {key: copied.randint(10, 99) for key in lookup_table()})
        shown = fmt.expert_block(solution)
        body = query + shown * k + solution
        # seeded by the whole trace, EOS included, as world-partial was built
        if withheld_share and random.Random(zlib.crc32((body + fmt.EOS).encode())).random() < withheld_share:
            body = body.replace(shown, fmt.expert_block(withhold_result(solution)))
    elif r < 0.85 and len(solution_steps(expr)) > 1:  # decomposition: the first operation to an expert
        (first, _value), *rest = solution_steps(expr)
        body = fmt.consult_block([first]) + fmt.expert_block(worked_solution(first))
        body += "".join(f"{op}={v} " for op, v in rest) + f"\\boxed{{{answer}}}"
    else:  # the expert was unavailable: solve alone
        body = fmt.consult_block([expr]) + fmt.expert_block(None) + worked_solution(expr)
    return prompt, body + fmt.EOS


def new_model(vocab_size: int, hidden: int, layers: int, max_positions: int, tok: PreTrainedTokenizerFast):
    """A Qwen2 with attention heads of ``HEAD_DIM``: a size vLLM's CPU backend serves (it refuses 16 and 24)."""
    if hidden % HEAD_DIM:
        raise ValueError(f"hidden size {hidden} is not a multiple of the head size {HEAD_DIM}")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=hidden // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def _padded(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to the longest row, and labels that keep only each row's completion."""
    width = max(len(seq) for seq, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    for i, (seq, start) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
    return ids, labels


def _slices(rows: list[tuple[list[int], int]], slice_tokens: int) -> list[list[tuple[list[int], int]]]:
    """Consecutive runs of length-sorted ``rows`` whose padded size stays within ``slice_tokens``."""
    parts: list[list[tuple[list[int], int]]] = [[]]
    for row in rows:
        if parts[-1] and (len(parts[-1]) + 1) * len(row[0]) > slice_tokens:
            parts.append([])
        parts[-1].append(row)
    return parts


def sft(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerFast,
    make_sample: Callable[[random.Random], Sample],
    steps: int,
    batch: int,
    seed: int,
    lr: float = 3e-3,
    name: str = "model",
    slice_tokens: int = 1024,
) -> float:
    """Supervised fine-tuning on freshly drawn samples; loss on completion tokens only.

    A batch is trained in length-sorted slices of at most ``slice_tokens`` padded tokens: the
    policy's traces run from 20 to 240 tokens, so one padded batch was 70% padding. The loss is
    still the mean over every completion token of the batch."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps))
    model.train()
    loss_value, t0 = float("nan"), time.monotonic()
    for step in range(steps):
        pairs = [make_sample(rng) for _ in range(batch)]
        rows = sorted(((tok.encode(p + c), len(tok.encode(p))) for p, c in pairs), key=lambda row: len(row[0]))
        parts = [_padded(part, tok.pad_token_id) for part in _slices(rows, slice_tokens)]
        counts = [int((labels[:, 1:] != -100).sum()) for _, labels in parts]  # the tokens each slice's loss averages
        opt.zero_grad(set_to_none=True)
        loss_value = 0.0
        total = sum(counts)
        for (ids, labels), count in zip(parts, counts, strict=True):
            share = count / total
            loss = model(input_ids=ids, attention_mask=ids != tok.pad_token_id, labels=labels).loss * share
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("sft %s: step %d/%d loss %.3f (%.0fs)", name, step + 1, steps, loss_value, time.monotonic() - t0)
    model.eval()
    return loss_value


CURRICULA: dict[str, Callable[[random.Random], Sample]] = {
    "policy": policy_sample,
    "policy_partial": functools.partial(policy_sample, withheld_share=0.5),
    "policy_unseen": functools.partial(policy_sample, unseen=unseen_facts(0.5)),
    "solver": solver_sample,
    "calculator": calculator_sample,
    # the lookup family (tasks.LOOKUP): the experts know the whole table, the policy a seeded half of it
    "policy_lookup": functools.partial(policy_sample, unseen=unseen_facts(0.5, ops=LOOKUP), tasks="lookup"),
    "policy_lookup_copy": functools.partial(
        policy_sample, unseen=unseen_facts(0.5, ops=LOOKUP), tasks="lookup", copied_share=1.0
    ),
    "solver_lookup": functools.partial(solver_sample, tasks="lookup"),
    "calculator_lookup": functools.partial(calculator_sample, tasks="lookup"),
}


def train_model(root: Path, name: str, spec: ModelSpec, cfg: WorldConfig) -> float:
    """SFT one model from its spec and save it (with the tokenizer) under ``root/name``."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = new_model(len(tok), spec.hidden, spec.layers, cfg.max_positions, tok)
    loss = sft(model, tok, CURRICULA[spec.curriculum], spec.sft_steps, cfg.sft_batch, cfg.seed, lr=spec.lr, name=name)
    model.save_pretrained(root / name, safe_serialization=True)
    tok.save_pretrained(root / name)
    return loss
