"""Loading a causal LM checkpoint, swapping weights into one, and its prompts' token ids: shared by the
policy engine, the CPU expert server, the rollout and the learner."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from proto import episode_format as fmt


def with_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` holding ``tensors``: a version of the same architecture as saved, where a tied
    weight appears once. Refuses tensors that are not the model's, and parameters left without one."""
    new = copy.deepcopy(model)
    missing, unexpected = new.load_state_dict(tensors, strict=False)
    state = new.state_dict()
    loaded = {state[name].data_ptr() for name in tensors}
    untied = [name for name in missing if state[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"not this model's weights: unexpected {unexpected[:5]}, missing {untied[:5]}")
    return new.eval()


def load_model(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load any causal LM checkpoint directory (the tiny world's or a real one).

    The tokenizer is read from its ``tokenizer.json`` exactly as shipped: ``AutoTokenizer`` would
    substitute the model family's own class (for Qwen2, a byte-level pipeline that drops our spaces).
    A tokenizer without a pad token (most base models) pads with EOS: padding is masked everywhere.
    """
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@functools.lru_cache(maxsize=256)  # a replica's groups in flight share prompts; past them a miss costs one render
def prompt_ids(tok: PreTrainedTokenizerFast, problem: str, max_queries: int | None) -> tuple[int, ...]:
    """The prompt under the policy's own chat template: the training prompt (the consult instruction
    with K = ``max_queries``) or, with None, the minimal evaluation prompt. The template writes any BOS
    itself, so no special tokens are added (as vLLM's chat endpoint does). Cached: a group's G episodes
    share a prompt, and rendering a template costs more than the encoding."""
    messages = fmt.eval_messages(problem) if max_queries is None else fmt.training_messages(problem, max_queries)
    return tuple(tok.backend_tokenizer.encode(fmt.render_prompt(tok, messages), add_special_tokens=False).ids)
