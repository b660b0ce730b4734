import numpy as np
import pytest

from proto import (
    SCHEMA_VERSION,
    AnnealState,
    ConsultRecord,
    CorruptPayloadError,
    PromptTask,
    SchemaVersionError,
    Trajectory,
    TrajectoryGroup,
    TurnRecord,
    WeightManifest,
    decode,
    encode,
)
from proto.codec import MAGIC


def make_group(n_samples: int = 2, length: int = 50, vocab: int = 100, seed: int = 0) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_samples):
        mask = np.zeros(length, bool)
        mask[10:30] = True
        mask[40:] = True
        samples.append(
            Trajectory(
                sample_index=i,
                token_ids=rng.integers(0, vocab, length).astype(np.int32),
                loss_mask=mask,
                behaviour_logprobs=np.where(mask, -rng.random(length), 0).astype(np.float32),
                prompt_len=10,
                turns=[
                    TurnRecord(start=10, end=30, policy_version=3, finish="consult"),
                    TurnRecord(start=40, end=length, policy_version=4, finish="eos"),
                ],
                consults=[
                    ConsultRecord(
                        turn=0,
                        query="2*3",
                        outcome="answer",
                        draw=0.25,
                        accepted=True,
                        injected_start=30,
                        injected_end=40,
                        detail="2*3=6",
                    )
                ],
                final_answer="6",
                score=1.0,
                work_holds=False,
                finish="answer",
                seed=99,
            )
        )
    return TrajectoryGroup(
        group_id="g1",
        prompt=PromptTask(prompt_id="p1", problem="2*3", answer="6"),
        anneal=AnnealState(step=3, acceptance=0.5, budget=3, penalty=0.1),
        samples=samples,
        rollout_replica="r0",
        created_at=1.0,
    )


def test_group_round_trip_is_exact():
    group = make_group()
    back = decode(encode(group), TrajectoryGroup)
    for a, b in zip(group.samples, back.samples, strict=True):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.behaviour_logprobs, b.behaviour_logprobs)
        assert a.turns == b.turns and a.consults == b.consults
        arrays = {"token_ids", "loss_mask", "behaviour_logprobs"}
        assert a.model_dump(exclude=arrays) == b.model_dump(exclude=arrays)  # score, f1, work_holds, …
    assert back.prompt == group.prompt and back.anneal == group.anneal
    assert back.min_policy_version == 3


def test_large_vocab_ids_survive():
    group = make_group(vocab=151_000)
    back = decode(encode(group), TrajectoryGroup)
    np.testing.assert_array_equal(back.samples[0].token_ids, group.samples[0].token_ids)


@pytest.mark.parametrize(
    "message",
    [
        AnnealState(step=1, acceptance=0.3, budget=2, penalty=0.05),
        PromptTask(prompt_id="a", problem="1+1", answer="2", tier=1),
        WeightManifest(version=2, step=2, created_at=0.0, files={"model.safetensors": "ab"}),
    ],
)
def test_small_messages_round_trip(message):
    assert decode(encode(message), type(message)) == message


def test_packed_arrays_are_compact():
    group = make_group(n_samples=8, length=4096)
    tokens = 8 * 4096
    assert len(encode(group)) / tokens < 9.5  # ids (u2) + log-probs (f4) + bit mask


def test_unknown_schema_version_is_rejected_clearly():
    payload = bytearray(encode(make_group()))
    payload[4] = 99
    with pytest.raises(SchemaVersionError, match="schema version 99 is not supported"):
        decode(bytes(payload), TrajectoryGroup)


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"", "shorter than the frame header"),
        (b"XXXX\x01\x01abc", "bad magic"),
        (MAGIC + bytes([SCHEMA_VERSION, 1]) + b"\xc1\xc1\xc1", "undecodable"),
        (MAGIC + bytes([SCHEMA_VERSION, 7]) + b"\x80", "unknown kind 7"),
    ],
)
def test_corrupt_payloads_are_rejected_clearly(payload, match):
    with pytest.raises(CorruptPayloadError, match=match):
        decode(payload, TrajectoryGroup)


def test_truncated_payload_is_rejected():
    payload = encode(make_group())
    for cut in (7, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CorruptPayloadError):
            decode(payload[:cut], TrajectoryGroup)


def test_wrong_message_type_is_rejected():
    with pytest.raises(CorruptPayloadError, match="expected TrajectoryGroup, payload holds AnnealState"):
        decode(encode(AnnealState(step=0, acceptance=1, budget=1, penalty=0)), TrajectoryGroup)


def trajectory(**overrides) -> Trajectory:
    fields = dict(
        sample_index=0,
        token_ids=np.arange(5),
        loss_mask=np.zeros(5, bool),
        behaviour_logprobs=np.zeros(5),
        prompt_len=2,
        turns=[],
        score=0,
        finish="eos",
        seed=0,
    )
    return Trajectory(**(fields | overrides))


def test_misaligned_arrays_are_invalid():
    with pytest.raises(ValueError, match="must have equal length"):
        trajectory(loss_mask=np.zeros(4, bool))


def test_prompt_tokens_may_not_be_trained_on():
    with pytest.raises(ValueError, match="prompt tokens must have loss mask 0"):
        trajectory(loss_mask=np.ones(5, bool))
