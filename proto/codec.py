"""The one codec for stream payloads and Redis values.

Frame: ``b"EAPO"`` · schema version (u8) · message kind (u8) · metadata length (u32) · msgpack
metadata · data section. Numpy arrays are not copied through msgpack: the metadata holds a small
reference (dtype, offset, count) and the raw little-endian bytes follow in the data section, so
decoding returns read-only zero-copy views. Integer arrays take the narrowest of uint16/int32 that
fits, bool arrays are bit-packed. A trajectory token costs ≈ 2–4 bytes (id) + 4 (behaviour
log-prob) + 1/8 (mask).
"""

from __future__ import annotations

import struct
from typing import TypeVar

import msgpack
import numpy as np
from pydantic import ValidationError

from proto.schemas import (
    SCHEMA_VERSION,
    AnnealState,
    Message,
    PromptTask,
    TrajectoryGroup,
    WeightManifest,
)

MAGIC = b"EAPO"
_HEADER = struct.Struct("<4sBB")
_META_LEN = struct.Struct("<I")

KINDS: dict[int, type[Message]] = {1: TrajectoryGroup, 2: PromptTask, 3: AnnealState, 4: WeightManifest}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}

_EXT_ARRAY = 1
_ARRAY_REF = struct.Struct("<BII")  # dtype code, byte offset into the data section, element count
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4"), 3: np.dtype("<f4"), 4: np.dtype("u1")}
_BITS = 4  # bool arrays: bit-packed uint8, count is the number of bits

M = TypeVar("M", bound=Message)


class ProtoError(ValueError):
    """A payload that cannot be read: the caller dead-letters or rejects it, never crashes."""


class SchemaVersionError(ProtoError):
    pass


class CorruptPayloadError(ProtoError):
    pass


class _Column:
    """Arrays that travel back to back as one array (a group's per-sample arrays of one field)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts


class _Packer:
    """msgpack ``default`` hook: an array becomes a small reference; its bytes are written afterwards,
    straight into the frame, so no intermediate copy of the bulk is made."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, int, list[np.ndarray], int]] = []  # offset, code, parts, count
        self.offset = 0

    def __call__(self, obj: object) -> object:
        if isinstance(obj, np.ndarray):
            obj = _Column([obj])
        if isinstance(obj, _Column):
            parts = obj.parts
            kinds = {p.dtype.kind for p in parts}
            if len(kinds) != 1:
                raise TypeError(f"column mixes dtype kinds {sorted(kinds)}")
            kind = kinds.pop()
            if kind == "b":
                code = _BITS
            elif kind in "iu":
                narrow = all(p.size == 0 or (int(p.min()) >= 0 and int(p.max()) < 1 << 16) for p in parts)
                code = 1 if narrow else 2
            elif kind == "f":
                code = 3
            else:
                raise TypeError(f"cannot encode arrays of dtype kind {kind!r}")
            count = sum(p.size for p in parts)
            ref = msgpack.ExtType(_EXT_ARRAY, _ARRAY_REF.pack(code, self.offset, count))
            self.pending.append((self.offset, code, parts, count))
            self.offset += (count + 7) // 8 if code == _BITS else count * _DTYPES[code].itemsize
            return ref
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__}")

    def write(self, out: bytearray, base: int) -> None:
        for offset, code, parts, _ in self.pending:
            if code == _BITS:
                bits = np.packbits(np.concatenate(parts) if len(parts) > 1 else parts[0])
                np.frombuffer(out, np.uint8, count=bits.size, offset=base + offset)[:] = bits
                continue
            dtype, pos = _DTYPES[code], base + offset
            for part in parts:
                np.copyto(np.frombuffer(out, dtype, count=part.size, offset=pos), part, casting="unsafe")
                pos += part.size * dtype.itemsize


def _unpacker(data: memoryview):
    """msgpack ``ext_hook`` resolving array references against the data section (zero-copy views)."""

    def hook(code: int, ref: bytes) -> np.ndarray:
        if code != _EXT_ARRAY or len(ref) != _ARRAY_REF.size:
            raise CorruptPayloadError(f"unknown extension value (code {code}, {len(ref)} bytes)")
        dtype_code, offset, count = _ARRAY_REF.unpack(ref)
        dtype = _DTYPES.get(dtype_code)
        if dtype is None:
            raise CorruptPayloadError(f"unknown array dtype code {dtype_code}")
        stored = (count + 7) // 8 if dtype_code == _BITS else count
        if offset + stored * dtype.itemsize > len(data):
            raise CorruptPayloadError(f"array of {stored} x {dtype} at offset {offset} runs past the payload")
        arr = np.frombuffer(data, dtype=dtype, count=stored, offset=offset)
        if dtype_code == _BITS:
            return np.unpackbits(arr, count=count).astype(bool)
        return arr

    return hook


# A group's per-sample arrays travel as one array per field (plus the lengths): three references per
# group instead of three per sample.
_COLUMNS = ("token_ids", "loss_mask", "behaviour_logprobs")


def _pack_columns(body: dict) -> None:
    samples = body["samples"]
    body["columns"] = {"lengths": [len(s["token_ids"]) for s in samples]} | {
        name: _Column([s.pop(name) for s in samples]) for name in _COLUMNS
    }


def _unpack_columns(body: dict) -> None:
    columns = body.pop("columns")
    lengths, samples = columns["lengths"], body["samples"]
    if len(lengths) != len(samples) or any(len(columns[n]) != sum(lengths) for n in _COLUMNS):
        raise CorruptPayloadError("group columns do not match the sample lengths")
    ends = np.cumsum(lengths).tolist()
    for name in _COLUMNS:
        column = columns[name]
        for sample, start, end in zip(samples, [0, *ends[:-1]], ends, strict=True):
            sample[name] = column[start:end]


def encode(message: Message) -> memoryview:
    """The frame, as a view of the one buffer it was written into (Redis clients take it as is)."""
    kind = _KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a stream message")
    body = message.model_dump(mode="python")
    if isinstance(message, TrajectoryGroup):
        _pack_columns(body)
    packer = _Packer()
    meta = msgpack.packb(body, default=packer, use_bin_type=True)
    head = _HEADER.pack(MAGIC, SCHEMA_VERSION, kind) + _META_LEN.pack(len(meta)) + meta
    out = bytearray(len(head) + packer.offset)
    out[: len(head)] = head
    packer.write(out, len(head))
    return memoryview(out)


def decode(payload: bytes, expected: type[M]) -> M:
    """Decode and validate; raise ``SchemaVersionError`` or ``CorruptPayloadError`` with the reason."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CorruptPayloadError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) < _HEADER.size:
        raise CorruptPayloadError(f"payload of {len(payload)} bytes is shorter than the frame header")
    magic, version, kind = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CorruptPayloadError(f"bad magic {magic!r}: not an EAPO payload")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema version {version} is not supported (this build reads version {SCHEMA_VERSION})"
        )
    cls = KINDS.get(kind)
    if cls is not expected:
        name = cls.__name__ if cls else f"unknown kind {kind}"
        raise CorruptPayloadError(f"expected {expected.__name__}, payload holds {name}")
    view = memoryview(payload)
    try:
        (meta_len,) = _META_LEN.unpack_from(view, _HEADER.size)
        meta_end = _HEADER.size + _META_LEN.size + meta_len
        if meta_end > len(view):
            raise CorruptPayloadError(f"metadata of {meta_len} bytes runs past the {len(view)}-byte payload")
        body = msgpack.unpackb(
            view[_HEADER.size + _META_LEN.size : meta_end], ext_hook=_unpacker(view[meta_end:]), raw=False
        )
        if expected is TrajectoryGroup:
            _unpack_columns(body)
    except CorruptPayloadError:
        raise
    except Exception as exc:  # msgpack and a mangled layout raise several unrelated types on garbage
        raise CorruptPayloadError(f"undecodable {expected.__name__} body: {exc}") from exc
    try:
        return expected.model_validate(body)
    except ValidationError as exc:
        raise CorruptPayloadError(f"invalid {expected.__name__}: {exc}") from exc
