"""OpenAI's error body for every failure, with the HTTP status an OpenAI client expects.

``{"error": {"message", "type", "param", "code"}}``: 400 for a request the swarm cannot serve
as written, 401 for a bad token, 404 for an unknown model, 503 when the swarm cannot run it
now (no registry answers, or no live server holds some block). The ``code`` doubles as the
kind in the errors metric.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedswarm.common.errors import FedswarmError, InputError

INVALID = "invalid_request_error"
SERVER = "server_error"


@dataclass
class ApiError(Exception):
    """An error answer: its status and the fields of OpenAI's error body."""

    status: int
    message: str
    type: str = INVALID
    param: str | None = None
    code: str | None = None

    @property
    def kind(self) -> str:
        """The errors metric's label."""
        return self.code or self.type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def from_exception(exc: BaseException) -> ApiError:
    """The answer for an exception raised while preparing or running a generation."""
    from fedswarm.client.swarm.routing import NoRouteError
    from fedswarm.client.swarm.service import ContextLengthError, ModelNotFoundError

    if isinstance(exc, ApiError):
        return exc
    text = " ".join(str(exc).split())
    if isinstance(exc, ModelNotFoundError) or type(exc).__name__ == "UnknownAdapterError":
        return ApiError(404, text, param="model", code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, text, param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, InputError):
        return ApiError(400, text, param=_param_of(text), code="invalid_value")
    if isinstance(exc, NoRouteError):
        return ApiError(503, text, type=SERVER, code="no_live_server")
    if isinstance(exc, FedswarmError):
        return ApiError(503, text, type=SERVER, code="swarm_unavailable")
    return ApiError(500, f"internal error: {type(exc).__name__}", type=SERVER, code="internal_error")


def from_validation(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """The answer for a body FastAPI could not parse or validate (bad JSON, missing or mistyped fields)."""
    if not errors:
        return ApiError(400, "invalid request body", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "not JSON")
        return ApiError(400, f"the body is not valid JSON ({detail})", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if first.get("type") == "missing":
        return ApiError(400, f"{where}: required field missing", param=param, code="missing_required_parameter")
    return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")


def _param_of(message: str) -> str | None:
    """The request field an InputError names at its start (``"top_p must be ..."``, ``"stop: at most 4"``)."""
    match = re.match(r"^([a-z_]+)(?::| must)", message)
    return match.group(1) if match else None
