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


class _Packer:
    """msgpack ``default`` hook that moves array bytes out of band into ``buffers``."""

    def __init__(self) -> None:
        self.buffers: list[bytes | memoryview] = []
        self.offset = 0

    def _ref(self, code: int, data: np.ndarray, count: int) -> msgpack.ExtType:
        data = np.ascontiguousarray(data)
        ref = msgpack.ExtType(_EXT_ARRAY, _ARRAY_REF.pack(code, self.offset, count))
        self.buffers.append(memoryview(data).cast("B"))
        self.offset += data.nbytes
        return ref

    def __call__(self, obj: object) -> object:
        if isinstance(obj, np.ndarray):
            if obj.dtype == np.bool_:
                return self._ref(_BITS, np.packbits(obj), obj.size)
            if obj.dtype.kind in "iu":
                narrow = obj.size == 0 or (int(obj.min()) >= 0 and int(obj.max()) < 1 << 16)
                code = 1 if narrow else 2
                return self._ref(code, obj.astype(_DTYPES[code], copy=False), obj.size)
            if obj.dtype.kind == "f":
                return self._ref(3, obj.astype(_DTYPES[3], copy=False), obj.size)
            raise TypeError(f"cannot encode array of dtype {obj.dtype}")
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__}")


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
        return arr.astype(np.int32) if dtype_code == 1 else arr

    return hook


# A group's per-sample arrays travel as one concatenated array per field (plus the lengths): three
# extension values per group instead of three per sample, which is most of the codec's cost.
_COLUMNS = ("token_ids", "loss_mask", "behaviour_logprobs")


def _pack_columns(body: dict) -> None:
    samples = body["samples"]
    body["columns"] = {"lengths": [len(s["token_ids"]) for s in samples]} | {
        name: np.concatenate([s.pop(name) for s in samples]) for name in _COLUMNS
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


def encode(message: Message) -> bytes:
    kind = _KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a stream message")
    body = message.model_dump(mode="python")
    if isinstance(message, TrajectoryGroup):
        _pack_columns(body)
    packer = _Packer()
    meta = msgpack.packb(body, default=packer, use_bin_type=True)
    return b"".join([_HEADER.pack(MAGIC, SCHEMA_VERSION, kind), _META_LEN.pack(len(meta)), meta, *packer.buffers])


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
