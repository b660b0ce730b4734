"""Seeded property-based fuzzing (hypothesis, ``derandomize``) of what reads untrusted bytes and text:
the stream codec, the consult-block parser and the reward's work check. Every input gets an answer or a
``ProtoError`` with a reason — never another exception, never a hang."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import make_group

from proto import PromptTask, ProtoError, TrajectoryGroup, decode, encode
from proto import episode_format as fmt
from rollout_service.consult import parse_consult
from rollout_service.reward import work_holds

FUZZ = settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
PAYLOAD = bytes(encode(make_group(n_samples=3, length=40)))


def decodes_or_says_why(payload: bytes, kind: type = TrajectoryGroup) -> None:
    try:
        decoded = decode(payload, kind)
    except ProtoError as exc:
        assert str(exc)  # says what is wrong
    else:
        assert isinstance(decoded, kind)


@FUZZ
@given(cut=st.integers(0, len(PAYLOAD) - 1))
def test_truncated_frames(cut):
    with pytest.raises(ProtoError):
        decode(PAYLOAD[:cut], TrajectoryGroup)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(PAYLOAD) - 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_frames(flips):
    data = bytearray(PAYLOAD)
    for at, bit in flips:
        data[at] ^= 1 << bit
    decodes_or_says_why(bytes(data))  # a flipped log-prob is still a valid frame; a flipped length is not


@FUZZ
@given(at=st.integers(0, len(PAYLOAD)), junk=st.binary(min_size=1, max_size=64))
def test_spliced_and_garbage_frames(at, junk):
    decodes_or_says_why(PAYLOAD[:at] + junk + PAYLOAD[at:])
    decodes_or_says_why(junk)
    decodes_or_says_why(junk, PromptTask)


@FUZZ
@given(version=st.integers(0, 255), kind=st.integers(0, 255))
def test_every_header_variant(version, kind):
    data = bytearray(PAYLOAD)
    data[4], data[5] = version, kind
    decodes_or_says_why(bytes(data))


def test_oversized_declared_lengths_are_refused_without_allocating():
    data = bytearray(PAYLOAD)
    data[6:10] = (2**32 - 1).to_bytes(4, "little")  # metadata "4 GiB long"
    with pytest.raises(ProtoError, match="runs past"):
        decode(bytes(data), TrajectoryGroup)


TAGS = st.sampled_from(
    [fmt.CONSULT_OPEN, fmt.CONSULT_CLOSE, fmt.QUERY_SEP, fmt.EXPERT_OPEN, " ", "2+3", "\n", "", "x " * 100]
)


@FUZZ
@given(text=st.one_of(st.text(max_size=3000), st.lists(TAGS, max_size=60).map("".join)), k=st.integers(1, 5))
def test_consult_parser_always_answers_by_its_rules(text, k):
    parsed = parse_consult(text, k, max_query_chars=256)
    assert len(parsed.queries) <= k
    assert all(q and q == q.strip() and len(q) <= 256 for q in parsed.queries)
    assert bool(parsed.queries) != ("no_query" in parsed.issues or "unopened" in parsed.issues)


@FUZZ
@given(text=st.text(alphabet="0123456789+-*= ({[#x", max_size=40))
def test_the_work_check_answers_any_text(text):
    assert work_holds(text) in (True, False, None)  # leading zeros, runs of signs: never an exception


@FUZZ
@given(
    operands=st.lists(st.integers(-999, 999), min_size=2, max_size=5), ops=st.lists(st.sampled_from("+-*"), min_size=4)
)
def test_the_work_check_accepts_every_true_equation(operands, ops):
    expr = str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:], strict=False))
    assert work_holds(f"{expr}={eval(expr)} \\boxed{{0}}") is True  # eval of digits and + - * only
