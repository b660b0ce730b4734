"""Wire contracts: message schemas, stream and key names, the codec."""

from proto.codec import CorruptPayloadError, ProtoError, SchemaVersionError, decode, encode
from proto.names import Names
from proto.schemas import (
    SCHEMA_VERSION,
    AnnealState,
    ConsultRecord,
    ConsultRequest,
    ConsultResponse,
    ConsultResult,
    Message,
    PromptTask,
    Trajectory,
    TrajectoryGroup,
    TurnRecord,
    WeightManifest,
)

__all__ = [
    "SCHEMA_VERSION",
    "AnnealState",
    "ConsultRecord",
    "ConsultRequest",
    "ConsultResponse",
    "ConsultResult",
    "CorruptPayloadError",
    "Message",
    "Names",
    "PromptTask",
    "ProtoError",
    "SchemaVersionError",
    "Trajectory",
    "TrajectoryGroup",
    "TurnRecord",
    "WeightManifest",
    "decode",
    "encode",
]
