"""A user's own model, built in the test: a byte-level BPE tokenizer trained with ``tokenizers`` on
consult traces (so merges such as ``></`` and ``>\\n`` straddle the tags), a ChatML chat template, and
a tiny random Qwen2 (attention head size 32) briefly fine-tuned to consult. Nothing of the tiny
world's format is special here: the tags are plain text."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from eapo.dev.world.sft import sft
from eapo.dev.world.tasks import evaluate, make_problem
from proto import episode_format as fmt

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MAX_QUERIES = 3


def problem(rng: random.Random) -> tuple[str, str]:
    p = make_problem(rng, rng.choice([1, 2]), 0, "sft")
    return p.problem, p.answer


def prompt(tok: PreTrainedTokenizerFast, question: str) -> str:
    return fmt.render_prompt(tok, fmt.training_messages(question, MAX_QUERIES))


def consult_trace(rng: random.Random) -> tuple[str, str]:
    """A question, then a consult block (sometimes several queries, a newline after the tag), the
    expert's answer and the boxed result: what the policy is taught to do."""
    question, answer = problem(rng)
    queries = [question] * rng.randint(1, 2)
    after = rng.choice(["", "\n", " "])
    block = fmt.consult_block(queries) + after + fmt.expert_block(answer) * len(queries)
    return question, block + f" \\boxed{{{answer}}}"


def build_tokenizer(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    corpus = []
    for _ in range(1000):
        question, completion = consult_trace(rng)
        corpus.append(f"<|im_start|>system\n{fmt.consult_instruction(MAX_QUERIES)}<|im_end|>\n")
        corpus.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


def build_model(root: Path, sft_steps: int = 80, seed: int = 0) -> Path:
    """Tokenizer and model saved as a Hugging Face model directory at ``root``; with ``sft_steps`` the
    policy learns to open a consult block right away (a few seconds on one core)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    if sft_steps:

        def sample(rng: random.Random) -> tuple[str, str]:
            question, completion = consult_trace(rng)
            return prompt(tok, question), completion + tok.eos_token

        sft(model, tok, sample, sft_steps, batch=8, seed=seed, lr=1e-2, name="bpe-policy")
    model.save_pretrained(root, safe_serialization=True)
    tok.save_pretrained(root)
    return root


def write_problems(path: Path, n: int, seed: int = 0) -> Path:
    """A user's own data set in the AIME layout (``problem``, ``answer``)."""
    import json

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        question, _ = problem(rng)
        lines.append(json.dumps({"problem": question, "answer": str(evaluate(question))}))
    path.write_text("\n".join(lines) + "\n")
    return path
