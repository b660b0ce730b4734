"""The lean Qwen2 decoder computes what transformers' forward computes (to the last bits), so sampling
through it replays the same tokens; models it does not reproduce go through transformers. Requests join
a running batch and leave it (continuous batching) and still sample as if alone, each on the weights of
the version it reports."""

import asyncio
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import eapo.inference.sampling as sampling
from eapo.inference.decoder import Qwen2Decoder, TransformersDecoder, open_decoder
from eapo.inference.sampling import Batcher, RunningBatch, SampleRequest, generate_batch

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
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # trained biases are not zero: the lean decoder's rotated q and k biases must count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


def prompts(lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


# The lean decoder's rows start at column 0 and attend over the batch's longest row, masked; transformers'
# rows are left-padded. The same sums over other masked widths round differently in the last bits.
ROUNDING = {"rtol": 0, "atol": 1e-5}


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
    lean, reference = open_decoder(model, len(lengths), pad_id=0), TransformersDecoder(model, pad_id=0)
    assert isinstance(lean, Qwen2Decoder)
    budgets = [10] * len(lengths)
    torch.testing.assert_close(
        lean.add(prompts(lengths), budgets), reference.add(prompts(lengths), budgets), **ROUNDING
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        ids = torch.randint(1, VOCAB, (len(lengths),), generator=gen).tolist()
        torch.testing.assert_close(lean.step(ids), reference.step(ids), **ROUNDING)


@torch.inference_mode()
def test_rows_that_join_and_leave_a_running_batch_compute_as_if_alone():
    model = qwen2()
    a, b, c = prompts([7, 12, 3])
    batch = Qwen2Decoder(model, 3, columns=4)  # too few columns: the cache grows
    alone = {name: Qwen2Decoder(model, 1) for name in "abc"}
    gen = torch.Generator().manual_seed(3)

    def check(logits: torch.Tensor, names: str) -> None:
        for row, name in enumerate(names):
            torch.testing.assert_close(logits[row], last[name], **ROUNDING)

    last = {"a": alone["a"].add([a], [20])[0], "b": alone["b"].add([b], [20])[0]}
    check(batch.add([a, b], [20, 20]), "ab")
    assert batch.cache[0].shape[2] == 12 + 20  # exactly b's prompt and budget (more than twice 4 columns)
    for _ in range(3):
        ids = torch.randint(1, VOCAB, (2,), generator=gen).tolist()
        last |= {name: alone[name].step([i])[0] for name, i in zip("ab", ids, strict=True)}
        check(batch.step(ids), "ab")
    last["c"] = alone["c"].add([c], [40])[0]
    check(batch.add([c], [40]), "c")  # joins while a and b run
    batch.keep([2, 0])  # b leaves; c and a swap rows
    for _ in range(20):
        ids = torch.randint(1, VOCAB, (2,), generator=gen).tolist()
        last |= {name: alone[name].step([i])[0] for name, i in zip("ca", ids, strict=True)}
        check(batch.step(ids), "ca")
    assert batch.cache[0].shape[2] >= 3 + 40


@pytest.mark.parametrize("lengths", [(4, 9, 2), (6,)], ids=["batch", "one"])
def test_sampling_replays_the_same_tokens_through_either_decoder(monkeypatch, lengths):
    model = qwen2()
    requests = [SampleRequest(list(range(1, 1 + n)), 16, frozenset({VOCAB - 1}), seed=n) for n in lengths]
    lean = generate_batch(model, requests, pad_id=0)
    monkeypatch.setattr(sampling, "open_decoder", lambda m, _rows, pad_id: TransformersDecoder(m, pad_id))
    reference = generate_batch(model, requests, pad_id=0)
    assert [r.token_ids for r in lean] == [r.token_ids for r in reference]
    for ours, theirs in zip(lean, reference, strict=True):
        torch.testing.assert_close(ours.logprobs, theirs.logprobs, **ROUNDING)
    assert any(len(r.token_ids) > 1 for r in lean)


def test_models_the_lean_decoder_does_not_reproduce_go_through_transformers():
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)
    )
    assert isinstance(open_decoder(llama, 1, 0), TransformersDecoder)
    assert isinstance(open_decoder(qwen2().to(torch.bfloat16), 1, 0), TransformersDecoder)
    scaled = qwen2()
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert isinstance(open_decoder(scaled, 1, 0), TransformersDecoder)
    sliding = qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert isinstance(open_decoder(sliding, 1, 0), TransformersDecoder)
    eager = qwen2()
    eager.config._attn_implementation = "eager"
    assert isinstance(open_decoder(eager, 1, 0), TransformersDecoder)
    assert isinstance(open_decoder(qwen2(), 1, 0), Qwen2Decoder)


def test_a_request_joins_a_running_batch_at_the_next_token_and_samples_as_alone():
    model = qwen2()
    quick, long, short = (
        SampleRequest(p, n, seed=i) for i, (p, n) in enumerate(zip(prompts([4, 5, 9]), [3, 30, 5], strict=True))
    )
    batch = RunningBatch(model, max_rows=4, pad_id=0)
    batch.admit([quick, long], ["quick", "long"])
    assert batch.advance() == [] and batch.advance() == []
    assert batch.room == 2
    batch.admit([short], ["short"])  # joins while both run
    finished = dict(batch.advance())
    assert list(finished) == ["quick"]
    assert [row.handle for row in batch.rows] == ["short", "long"]  # the last row moved into the hole
    while "short" not in finished:
        finished |= dict(batch.advance())
    assert [row.handle for row in batch.rows] == ["long"]  # the short one left first
    while batch.rows:
        finished |= dict(batch.advance())
    for name, request in (("quick", quick), ("long", long), ("short", short)):
        assert finished[name].token_ids == generate_batch(model, [request], pad_id=0)[0].token_ids
    assert [len(finished[n].token_ids) for n in ("quick", "long", "short")] == [3, 30, 5]


def test_rows_given_up_leave_and_the_others_sample_as_alone():
    model = qwen2()
    a, b, c = (SampleRequest(p, 12, seed=i) for i, p in enumerate(prompts([4, 5, 9])))
    for steps_before in (0, 2):  # dropped right after the prefill, and between steps
        batch = RunningBatch(model, max_rows=4, pad_id=0)
        batch.admit([a, b, c], ["a", "b", "c"])
        for _ in range(steps_before):
            assert batch.advance() == []
        batch.drop(lambda handle: handle == "a")
        assert [row.handle for row in batch.rows] == ["c", "b"]
        finished = {}
        while batch.rows:
            finished |= dict(batch.advance())
        assert sorted(finished) == ["b", "c"]
        for name, request in (("b", b), ("c", c)):
            assert finished[name].token_ids == generate_batch(model, [request], pad_id=0)[0].token_ids


def test_a_decoder_that_cannot_take_rows_mid_batch_takes_them_when_it_drains():
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1)
    ).eval()
    batch = RunningBatch(llama, max_rows=4, pad_id=0)
    batch.admit([SampleRequest([1, 2, 3], 3)], [0])
    assert batch.room == 0
    with pytest.raises(ValueError, match="room for 0"):
        batch.admit([SampleRequest([4], 2)], [1])
    while batch.rows:
        batch.advance()
    assert batch.room == 4


async def test_new_weights_wait_for_the_running_rows_and_each_result_names_its_weights(monkeypatch):
    old, new = qwen2(), qwen2()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5 * torch.randn_like(p))
    admitted = threading.Event()
    real_admit = RunningBatch.admit

    def admit(self, requests, handles):
        real_admit(self, requests, handles)
        if requests:
            admitted.set()

    monkeypatch.setattr(RunningBatch, "admit", admit)
    batcher = Batcher(old, pad_id=0, max_batch=8, version=0)
    first, second = (SampleRequest(p, 200, seed=i) for i, p in enumerate(prompts([6, 6])))
    try:
        running = asyncio.create_task(batcher.sample(first))
        assert await asyncio.to_thread(admitted.wait, 60)  # the first row runs on the old weights
        batcher.set_model(new, version=1)
        assert batcher.version == 1
        results = await asyncio.wait_for(asyncio.gather(running, batcher.sample(second)), timeout=120)
        assert [version for _, version in results] == [0, 1]
        for request, (result, version) in zip((first, second), results, strict=True):
            model = old if version == 0 else new
            assert result.token_ids == generate_batch(model, [request], pad_id=0)[0].token_ids
        assert generate_batch(old, [second], 0)[0].token_ids != generate_batch(new, [second], 0)[0].token_ids
    finally:
        await batcher.close()


@pytest.mark.parametrize(
    "request_, why",
    [
        (SampleRequest([1, 2], 4, stop_strings=("</consult>",)), "stop strings need the model's tokenizer"),
        (SampleRequest([], 4), "empty prompt"),
        (SampleRequest([1, VOCAB], 4), "outside the model's vocabulary of 50"),
        (SampleRequest([1, 2], 0), "max_new_tokens 0"),
    ],
    ids=["stop-strings-without-tokenizer", "empty", "unknown-id", "no-tokens"],
)
async def test_a_request_the_batcher_cannot_sample_fails_alone_and_the_batcher_serves_on(request_, why):
    batcher = Batcher(qwen2(), pad_id=0, max_batch=8)  # no tokenizer: stop strings cannot be read
    try:
        running = asyncio.create_task(batcher.sample(SampleRequest([3, 4], 30)))
        with pytest.raises(ValueError, match=why):
            await batcher.sample(request_)
        result, version = await asyncio.wait_for(running, timeout=60)
        assert len(result.token_ids) == 30 and version == 0
    finally:
        await batcher.close()


async def test_a_failed_forward_fails_its_rows_and_the_batcher_serves_on(monkeypatch):
    real_advance, calls = RunningBatch.advance, []

    def advance(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real_advance(self)

    monkeypatch.setattr(RunningBatch, "advance", advance)
    batcher = Batcher(qwen2(), pad_id=0, max_batch=8)
    try:
        with pytest.raises(RuntimeError, match="generation failed: RuntimeError\\('out of memory'\\)"):
            await asyncio.wait_for(batcher.sample(SampleRequest([1, 2], 4)), timeout=60)
        result, _ = await asyncio.wait_for(batcher.sample(SampleRequest([1, 2], 4)), timeout=60)
        assert len(result.token_ids) == 4
    finally:
        await batcher.close()


async def test_close_fails_what_runs_and_every_later_request():
    batcher = Batcher(qwen2(), pad_id=0, max_batch=8)
    running = asyncio.create_task(batcher.sample(SampleRequest([1, 2], 400)))
    await asyncio.sleep(0)  # queued, perhaps started: a few hundred tokens from done
    await batcher.close()
    with pytest.raises(RuntimeError, match="the batcher closed"):
        await asyncio.wait_for(running, timeout=60)
    with pytest.raises(RuntimeError, match="the batcher is closed"):
        await batcher.sample(SampleRequest([1], 2))
    await batcher.close()  # twice is harmless
