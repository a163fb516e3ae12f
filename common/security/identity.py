"""Who a swarm peer is: the certificate it presented in mutual TLS, reduced to what the swarm checks.

A block server's identity is its certificate from the federation's CA: the SHA-256 fingerprint of
the certificate (what ``--deny`` names), its common name, the host names and addresses it covers
(what it may announce), and whether it may serve at all (a server certificate, not a client's).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

PEM_KEY = "x509_pem_cert"  # gRPC's auth-context property holding the verified peer certificate


@dataclass(frozen=True)
class Identity:
    """A verified peer certificate."""

    fingerprint: str  # lower-case hex SHA-256 of the certificate's DER bytes
    name: str  # subject common name
    hosts: frozenset[str]  # DNS names and IP addresses (normalised) of its subject alternative names
    may_serve: bool  # extended key usage includes serverAuth

    def covers(self, host: str) -> bool:
        """Whether the certificate names ``host`` (a DNS name, case-insensitive, or an IP address)."""
        return normalise_host(host) in self.hosts


def normalise_host(host: str) -> str:
    """``host`` as the certificate comparison sees it: IP addresses canonical, names lower-case."""
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def normalise_fingerprint(text: str) -> str:
    """``AB:CD:...`` or ``abcd...`` to 64 lower-case hex digits; ``ValueError`` otherwise."""
    digits = text.strip().replace(":", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"{text!r} is not a SHA-256 certificate fingerprint (64 hex digits)")
    return digits


def identity_of_pem(pem: bytes) -> Identity:
    """The identity a PEM certificate carries (the first certificate of a chain)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    hosts: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts.update(normalise_host(name) for name in san.get_values_for_type(x509.DNSName))
        hosts.update(str(address) for address in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        may_serve = ExtendedKeyUsageOID.SERVER_AUTH in usages
    except x509.ExtensionNotFound:
        may_serve = False
    return Identity(
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        name=str(names[0].value) if names else "",
        hosts=frozenset(hosts),
        may_serve=may_serve,
    )


def peer_identity(context: Any) -> Identity | None:
    """The verified certificate of the peer of a gRPC call, or None (plaintext, or no client certificate)."""
    pems = context.auth_context().get(PEM_KEY)
    return identity_of_pem(pems[0]) if pems else None
