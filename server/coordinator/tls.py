"""TLS material for the coordinator: a private CA and a server certificate signed by it.

The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS with the server
certificate; nodes and ``flwr`` trust the CA (``ca.crt``), which never leaves the
coordinator's operators except as that public certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, root: str | Path) -> CertPaths:
        root = Path(root)
        return cls(root / CA_CERT, root / SERVER_CERT, root / SERVER_KEY)

    def missing(self) -> list[Path]:
        return [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]


def make_certificates(out: str | Path, hosts: list[str], days: int = 365, force: bool = False) -> CertPaths:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` valid for ``hosts`` (names or IPs).

    Files already in ``out`` are replaced only with ``force``: a new CA locks out every node that
    still trusts the old ``ca.crt``, so it is never made by accident.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not hosts:
        raise InputError("--host: give at least one host name or IP address the nodes will dial")
    if days < 1:
        raise InputError(f"--days must be >= 1, got {days}")
    root = Path(out)
    if not force and (taken := next((p for p in _files(root) if p.exists()), None)):
        raise InputError(f"{taken} already exists; --force replaces the CA and server certificate in --out {out}")
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedswarm coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_key(root / CA_KEY, ca_key)
    _write_key(root / SERVER_KEY, key)
    (root / CA_CERT).write_bytes(ca_cert.public_bytes(_pem()))
    (root / SERVER_CERT).write_bytes(cert.public_bytes(_pem()))
    return CertPaths.in_dir(root)


def _files(root: Path) -> list[Path]:
    return [root / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]


def _san(host: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem() -> Encoding:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.PEM


def _write_key(path: Path, key: object) -> None:
    """A PKCS#8 PEM private key readable only by its owner."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(b"")
    path.chmod(0o600)
    path.write_bytes(data)
