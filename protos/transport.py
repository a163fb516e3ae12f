"""Connections of the swarm: TLS when certificates are given, and the shared swarm token.

The token travels as call metadata on every RPC (registry and block servers alike); the
servers check it with a constant-time comparison before any handler runs. Without TLS the
token crosses the network in clear text, so use both outside a trusted network.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedswarm.common.errors import FedswarmError

TOKEN_METADATA_KEY = "x-fedswarm-token"
TOKEN_ENV = "FEDSWARM_SWARM_TOKEN"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a 2048-token batch of 8 with hidden 2048 in float32 is 128 MiB
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Security:
    """What every swarm connection of a process uses: a token and optional TLS files."""

    token: str = ""  # shared swarm token; "" disables the check
    tls_ca: Path | None = None  # clients: CA that signed the servers' certificates
    tls_cert: Path | None = None  # servers: certificate chain (PEM)
    tls_key: Path | None = None  # servers: private key (PEM)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, self.token),) if self.token else ()


def security_from_args(token: str | None, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> Security:
    """Validate the CLI's security options; the token falls back to $FEDSWARM_SWARM_TOKEN."""
    if (tls_cert is None) != (tls_key is None):
        raise FedswarmError("--tls-cert and --tls-key go together: give both or neither")
    paths = {"--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    for flag, value in paths.items():
        if value is not None and not Path(value).is_file():
            raise FedswarmError(f"{flag} {value!r}: no such file")
    return Security(
        token=token if token is not None else os.environ.get(TOKEN_ENV, ""),
        tls_ca=Path(tls_ca) if tls_ca else None,
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
    )


def open_channel(address: str, security: Security) -> Any:
    """A channel to a swarm peer: TLS if a CA is configured, plaintext otherwise."""
    import grpc

    if security.tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=security.tls_ca.read_bytes())
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def bind_server(server: Any, host: str, port: int, security: Security) -> int:
    """Listen on ``host:port`` (0 picks a free port), with TLS when a certificate is configured."""
    import grpc

    address = f"{host}:{port}"
    if security.tls_cert is not None and security.tls_key is not None:
        creds = grpc.ssl_server_credentials([(security.tls_key.read_bytes(), security.tls_cert.read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise FedswarmError(f"cannot listen on {address} (port in use?)")
    return int(bound)


def token_interceptor(token: str) -> Any:
    """A server interceptor refusing every call whose metadata lacks the swarm token."""
    import grpc

    class _TokenCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
            given = dict(details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
            if hmac.compare_digest(str(given).encode(), token.encode()):
                return continuation(details)
            handler = continuation(details)
            return _refusal(handler)

    def _abort(request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid swarm token")

    def _refusal(handler: Any) -> Any:
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_abort)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_abort)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_abort)
        return grpc.unary_unary_rpc_method_handler(_abort)

    return _TokenCheck()


def server_interceptors(security: Security) -> list[Any]:
    return [token_interceptor(security.token)] if security.token else []
