"""TLS material of the federation: a private CA, the coordinator's certificate, and the swarm's.

The SuperLink serves its Fleet, Control and Runtime APIs over HTTPS with the server
certificate; nodes and ``flwr`` trust the CA (``ca.crt``), which never leaves the
coordinator's operators except as that public certificate. The same CA issues each swarm
registry and block server its own certificate (``issue_certificate``: its identity, naming the
addresses it may announce) and each swarm client one; ``ca.key`` stays where it was made.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

ISSUE_KINDS = ("server", "client")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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


@dataclass(frozen=True)
class Issued:
    """A certificate issued by the CA in a folder, and its private key."""

    cert: Path
    key: Path
    fingerprint: str  # hex SHA-256 of the certificate (what `fedswarm swarm registry --deny` names)


def issue_certificate(
    out: str | Path, kind: str, name: str, hosts: list[str], days: int = 365, force: bool = False
) -> Issued:
    """Write ``NAME.pem``/``NAME.key`` in ``out``, signed by the CA already there (``ca.crt``/``ca.key``).

    A ``server`` certificate (a swarm registry or block server) names ``hosts``, the names and
    addresses it may listen on and announce, and serves as its client certificate too (it announces
    to registries); a ``client`` certificate only identifies a client to the servers.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if kind not in ISSUE_KINDS:
        raise InputError(f"--issue {kind!r}: choose one of {', '.join(ISSUE_KINDS)}")
    if not NAME_PATTERN.match(name) or name in ("ca", "server"):
        raise InputError(f"--name {name!r}: letters, digits, '.', '_', '-' (not 'ca' or 'server'), at most 64")
    if kind == "server" and not hosts:
        raise InputError("--host: a server certificate needs the host names or IP addresses it will announce")
    if days < 1:
        raise InputError(f"--days must be >= 1, got {days}")
    root = Path(out)
    paths = CertPaths.in_dir(root)
    ca_key_path = root / CA_KEY
    if not paths.ca_cert.is_file() or not ca_key_path.is_file():
        raise InputError(f"no CA in {root} (ca.crt and ca.key): make one with `fedswarm certs --out {root} --host ...`")
    cert_path, key_path = root / f"{name}.pem", root / f"{name}.key"
    if not force and (taken := next((p for p in (cert_path, key_path) if p.exists()), None)):
        raise InputError(f"{taken} already exists; --force issues {name!r} again")
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if kind == "server" else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(_pem()))
    return Issued(cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex())


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


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
