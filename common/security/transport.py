"""Connections of the swarm: mutual TLS with the federation's CA, and the optional shared token.

Secure is the default: every swarm process has a certificate issued by the federation's CA and
every connection is mutual TLS (a server accepts only peers whose certificate the CA signed, a
client checks the server's certificate against the CA and the address it dials). The token, when
set, travels as call metadata and is checked on top (constant-time) before any handler runs.
``insecure`` is plaintext without either check, for a trusted machine only.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedswarm.common.errors import FedswarmError

log = logging.getLogger("fedswarm.swarm")

TOKEN_METADATA_KEY = "x-fedswarm-token"
TOKEN_ENV = "FEDSWARM_SWARM_TOKEN"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a 2048-token batch of 8 with hidden 2048 in float32 is 128 MiB
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Security:
    """What every swarm connection of a process uses: its certificate, the CA, the token.

    Without ``tls_ca`` the connections are plaintext: the CLI allows that only with ``--insecure``.
    """

    token: str = ""  # shared swarm token; "" disables the check
    tls_ca: Path | None = None  # the federation's CA: peers' certificates must be signed by it
    tls_cert: Path | None = None  # this process's certificate (PEM): server side and client side alike
    tls_key: Path | None = None  # its private key (PEM)
    insecure: bool = False  # chosen plaintext (recorded for logs)
    client_certs: bool = True  # servers: require a client certificate of the CA (False: the token instead)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, self.token),) if self.token else ()


def security_from_args(
    token: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    insecure: bool = False,
    client: bool = False,
    client_certs: bool = True,
) -> Security:
    """Validate the CLI's security options; the token falls back to $FEDSWARM_SWARM_TOKEN.

    Mutual TLS needs all three files; ``insecure`` none of them. A ``client`` may instead give the
    CA and the swarm token (for servers that take the token in place of a client certificate); a
    server with ``client_certs`` False takes the token from its clients, so it needs one. Anything
    else is a one-line error.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not client_certs and not token:
        raise FedswarmError("--client-auth token needs the swarm token (--token or $FEDSWARM_SWARM_TOKEN)")
    if not client_certs and insecure:
        raise FedswarmError("--client-auth token needs TLS: it cannot apply with --insecure")
    if client and token and tls_ca and not tls_cert and not tls_key and not insecure:
        if not Path(tls_ca).is_file():
            raise FedswarmError(f"--tls-ca {tls_ca!r}: no such file")
        return Security(token=token, tls_ca=Path(tls_ca))  # TLS, and the token in place of a certificate
    paths = {"--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    given = [flag for flag, value in paths.items() if value]
    if insecure:
        if given:
            raise FedswarmError(f"--insecure and {', '.join(given)} exclude each other: drop one")
        log.warning("--insecure: plaintext, no certificates; anyone who reaches the swarm can read prompts and join it")
        return Security(token=token, insecure=True)
    if len(given) < len(paths):
        missing = ", ".join(flag for flag in paths if flag not in given)
        raise FedswarmError(
            f"TLS is required: missing {missing} (issue certificates with `fedswarm certs --issue`), "
            "or --insecure on a trusted machine"
        )
    for flag, value in paths.items():
        if not Path(str(value)).is_file():
            raise FedswarmError(f"{flag} {value!r}: no such file")
    ca, cert, key = Path(str(tls_ca)), Path(str(tls_cert)), Path(str(tls_key))
    check_certificate(ca, cert, key)
    return Security(token=token, tls_ca=ca, tls_cert=cert, tls_key=key, client_certs=client_certs)


def check_certificate(ca_path: Path, cert_path: Path, key_path: Path) -> None:
    """One-line errors, before anything listens or dials, for files the handshake would refuse later."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except ValueError:
        raise FedswarmError(f"--tls-ca {ca_path}: not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise FedswarmError(f"--tls-cert {cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise FedswarmError(f"--tls-key {key_path}: not an unencrypted PEM private key") from None
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # noqa: BLE001 (InvalidSignature, or ValueError/TypeError for a mismatched key type)
        raise FedswarmError(
            f"--tls-cert {cert_path} was not issued by --tls-ca {ca_path} ({type(exc).__name__})"
        ) from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise FedswarmError(f"--tls-key {key_path} is not the key of --tls-cert {cert_path}")


def open_channel(address: str, security: Security) -> Any:
    """A channel to a swarm peer: mutual TLS if a CA is configured (the server's certificate must be
    signed by it and name ``address``'s host), plaintext otherwise."""
    import grpc

    if security.tls_ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=security.tls_ca.read_bytes(),
            private_key=security.tls_key.read_bytes() if security.tls_key else None,
            certificate_chain=security.tls_cert.read_bytes() if security.tls_cert else None,
        )
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def bind_server(server: Any, host: str, port: int, security: Security) -> int:
    """Listen on ``host:port`` (0 picks a free port): mutual TLS when a certificate is configured
    (peers must present a certificate the CA signed; with ``client_certs`` False, TLS alone and the
    token checks the clients), plaintext otherwise."""
    import grpc

    address = f"{host}:{port}"
    if security.tls_cert is not None and security.tls_key is not None:
        ca = security.tls_ca.read_bytes() if security.tls_ca and security.client_certs else None
        creds = grpc.ssl_server_credentials(
            [(security.tls_key.read_bytes(), security.tls_cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
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
