"""The one codec for stream payloads and Redis values.

Frame: ``b"EAPO"`` · schema version (u8) · message kind (u8) · msgpack body. Numpy arrays travel as
msgpack extension values holding raw little-endian bytes; integer arrays take the narrowest of
uint16/int32 that fits, bool arrays are bit-packed. A trajectory token therefore costs ≈ 2–4 bytes
(id) + 4 (behaviour log-prob) + 1/8 (mask).
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

KINDS: dict[int, type[Message]] = {1: TrajectoryGroup, 2: PromptTask, 3: AnnealState, 4: WeightManifest}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}

_EXT_U16, _EXT_I32, _EXT_F32, _EXT_BITS = 1, 2, 3, 4

M = TypeVar("M", bound=Message)


class ProtoError(ValueError):
    """A payload that cannot be read: the caller dead-letters or rejects it, never crashes."""


class SchemaVersionError(ProtoError):
    pass


class CorruptPayloadError(ProtoError):
    pass


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    if arr.dtype == np.bool_:
        return msgpack.ExtType(_EXT_BITS, struct.pack("<I", arr.size) + np.packbits(arr).tobytes())
    if arr.dtype.kind in "iu":
        if arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) < 1 << 16):
            return msgpack.ExtType(_EXT_U16, arr.astype("<u2", copy=False).tobytes())
        return msgpack.ExtType(_EXT_I32, arr.astype("<i4", copy=False).tobytes())
    if arr.dtype.kind == "f":
        return msgpack.ExtType(_EXT_F32, arr.astype("<f4", copy=False).tobytes())
    raise TypeError(f"cannot encode array of dtype {arr.dtype}")


def _default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> np.ndarray:
    if code == _EXT_U16:
        return np.frombuffer(data, dtype="<u2").astype(np.int32)
    if code == _EXT_I32:
        return np.frombuffer(data, dtype="<i4")
    if code == _EXT_F32:
        return np.frombuffer(data, dtype="<f4")
    if code == _EXT_BITS:
        (n,) = struct.unpack_from("<I", data)
        bits = np.frombuffer(data, dtype=np.uint8, offset=4)
        if n > bits.size * 8:
            raise CorruptPayloadError(f"bit array claims {n} bits but carries {bits.size * 8}")
        return np.unpackbits(bits, count=n).astype(bool)
    raise CorruptPayloadError(f"unknown array extension code {code}")


def encode(message: Message) -> bytes:
    kind = _KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a stream message")
    body = msgpack.packb(message.model_dump(mode="python"), default=_default, use_bin_type=True)
    return _HEADER.pack(MAGIC, SCHEMA_VERSION, kind) + body


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
    try:
        body = msgpack.unpackb(memoryview(payload)[_HEADER.size :], ext_hook=_ext_hook, raw=False)
    except CorruptPayloadError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CorruptPayloadError(f"undecodable {expected.__name__} body: {exc}") from exc
    try:
        return expected.model_validate(body)
    except ValidationError as exc:
        raise CorruptPayloadError(f"invalid {expected.__name__}: {exc}") from exc
