"""The in-process vLLM engine where vLLM cannot run (no GPU in CI): the conversion of vLLM's outputs
into turns, and a clear error when the engine is chosen without vLLM installed. The engine itself runs
only on a GPU machine."""

import importlib.util
from types import SimpleNamespace

import pytest

from eapo.core.config import EAPOConfig
from rollout_service.engine import open_engine
from rollout_service.vllm_engine import to_result


def completion(ids, logprobs, finish, stop_reason=None):
    """Shaped like vLLM's CompletionOutput with logprobs=0: one {token_id: Logprob} per sampled token."""
    steps = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, logprobs, strict=True)]
    return SimpleNamespace(token_ids=tuple(ids), logprobs=steps, finish_reason=finish, stop_reason=stop_reason)


def test_a_completion_becomes_a_turn_with_its_exact_ids_and_log_probs():
    turn = to_result(completion([5, 9, 2], [-0.25, -1.5, -0.125], "stop"))
    assert (turn.token_ids, turn.logprobs, turn.finish) == ([5, 9, 2], [-0.25, -1.5, -0.125], "stop")
    assert to_result(completion([5], [-0.5], "length")).finish == "length"


def test_a_stop_string_keeps_every_sampled_id_and_names_the_string():
    """vLLM cuts only the text at a stop string; the ids keep the token that completed it."""
    turn = to_result(completion([5, 9, 2], [-0.25, -1.5, -0.125], "stop", stop_reason="</consult>"))
    assert (turn.token_ids, turn.finish, turn.stop_string) == ([5, 9, 2], "stop", "</consult>")
    by_id = to_result(completion([5, 9, 2], [-0.25, -1.5, -0.125], "stop", stop_reason=2))  # a stop token id
    assert by_id.finish == "stop" and by_id.stop_string is None


def test_a_completion_without_log_probs_is_refused():
    with pytest.raises(RuntimeError, match="logprobs=0"):
        to_result(SimpleNamespace(token_ids=(5, 9), logprobs=None, finish_reason="stop"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
async def test_choosing_vllm_without_it_says_how_to_install_it(tmp_path):
    cfg = EAPOConfig.model_validate({"rollout": {"engine": "vllm", "vllm_args": {"gpu_memory_utilization": 0.5}}})
    with pytest.raises(RuntimeError, match=r"pip install '\.\[gpu\]'"):
        await open_engine(cfg, tmp_path, 0)
