"""The lean Qwen2 decoder computes what transformers' forward computes, bit for bit, so sampling through
it replays the same tokens; models it does not reproduce go through transformers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import eapo.inference.sampling as sampling
from eapo.inference.decoder import Qwen2Decoder, TransformersDecoder, open_decoder
from eapo.inference.sampling import SampleRequest, generate_batch

VOCAB = 50


def qwen2(heads: int = 2, kv_heads: int = 2, head_dim: int = 32, **config) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        **config,
    )
    return Qwen2ForCausalLM(config).eval()


def left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids, mask = (
        torch.zeros((len(lengths), width), dtype=torch.long),
        torch.zeros((len(lengths), width), dtype=torch.long),
    )
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize(
    "shape, lengths",
    [
        ({}, [7, 12, 3]),
        ({}, [9]),  # one row: other matmul shapes than a batch's
        ({}, [5, 5, 5]),  # no padding: transformers then drops the mask
        ({"kv_heads": 1}, [7, 12, 3]),  # grouped-query attention
        ({"heads": 4, "kv_heads": 2, "head_dim": 64}, [230, 200]),  # a prompt the kernel splits into blocks
    ],
    ids=["padded", "one-row", "unpadded", "gqa", "wide-long"],
)
@torch.inference_mode()
def test_lean_decoder_logits_equal_transformers_forward(shape, lengths):
    model = qwen2(**shape)
    ids, mask = left_padded(lengths)
    lean, reference = open_decoder(model, mask, 10), TransformersDecoder(model, mask)
    assert isinstance(lean, Qwen2Decoder)
    torch.testing.assert_close(lean.prefill(ids), reference.prefill(ids), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        step = torch.randint(1, VOCAB, (len(lengths), 1), generator=gen)
        torch.testing.assert_close(lean.step(step), reference.step(step), rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [(4, 9, 2), (6,)], ids=["batch", "one"])
def test_sampling_replays_the_same_tokens_through_either_decoder(monkeypatch, lengths):
    model = qwen2()
    requests = [SampleRequest(list(range(1, 1 + n)), 16, frozenset({VOCAB - 1}), seed=n) for n in lengths]
    lean = generate_batch(model, requests, pad_id=0)
    monkeypatch.setattr(sampling, "open_decoder", lambda m, mask, _steps: TransformersDecoder(m, mask))
    reference = generate_batch(model, requests, pad_id=0)
    assert [r.token_ids for r in lean] == [r.token_ids for r in reference]
    assert [r.logprobs for r in lean] == [r.logprobs for r in reference]
    assert any(len(r.token_ids) > 1 for r in lean)


def test_models_the_lean_decoder_does_not_reproduce_go_through_transformers():
    _, mask = left_padded([3])
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)
    )
    assert isinstance(open_decoder(llama, mask, 4), TransformersDecoder)
    assert isinstance(open_decoder(qwen2().to(torch.bfloat16), mask, 4), TransformersDecoder)
    scaled = qwen2()
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert isinstance(open_decoder(scaled, mask, 4), TransformersDecoder)
    sliding = qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert isinstance(open_decoder(sliding, mask, 4), TransformersDecoder)
    eager = qwen2()
    eager.config._attn_implementation = "eager"
    assert isinstance(open_decoder(eager, mask, 4), TransformersDecoder)
    assert isinstance(open_decoder(qwen2(), mask, 4), Qwen2Decoder)
