"""Which server errors are worth routing around, and how long to wait between attempts.

A server that vanished, timed out or is full is replaced; a server that says the request
itself is wrong (bad shape, wrong protocol, bad token) would say so again anywhere, so
that error goes straight to the user.
"""

from __future__ import annotations

from typing import Any

from fedswarm.common.errors import FedswarmError

MAX_ATTEMPTS = 6  # replacements tried for one failed hop before giving up
BASE_DELAY_S = 0.05  # first retry delay; doubles per attempt
MAX_DELAY_S = 2.0


def is_retriable(exc: BaseException) -> bool:
    import grpc

    if isinstance(exc, ConnectionError):  # the server closed the stream without an error status
        return True
    if not isinstance(exc, grpc.RpcError):
        return False
    fatal = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
    return exc.code() not in fatal


def is_stale_adapter(exc: BaseException) -> bool:
    """The server runs a newer version of the requested adapter (it was replaced while serving)."""
    import grpc

    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.ABORTED


def backoff_s(attempt: int) -> float:
    """Exponential backoff: 0.05 s, 0.1 s, 0.2 s ... capped at 2 s."""
    return min(BASE_DELAY_S * 2**attempt, MAX_DELAY_S)


def describe(exc: Any) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details() or ''}".strip().rstrip(":")
    return str(exc) or type(exc).__name__


def fatal_error(address: str, exc: BaseException) -> FedswarmError:
    """The one-line error for a server that refused the request itself."""
    import grpc

    if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return FedswarmError(f"server {address} refused the swarm token ({describe(exc)})")
    return FedswarmError(f"server {address} refused the request ({describe(exc)})")
