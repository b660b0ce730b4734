"""HTTP answers shared by the FastAPI servers of every layer (the gateway, the CPU expert server)."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from proto.schemas import ErrorBody, ErrorDetail


def openai_error(
    status: int, message: str, kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """A refusal in OpenAI's error shape (``proto.schemas.ErrorBody``); it is also an ASGI app."""
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, code=status))
    return JSONResponse(body.model_dump(), status, headers=headers)
