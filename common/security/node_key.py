"""A node's authentication key pair, in the form Flower's SuperNode authentication reads.

The private key (OpenSSH, EC P-384) stays on the node (``flower-supernode
--auth-supernode-private-key``); the public key (``.pub``, OpenSSH) goes to the
coordinator, which registers it with ``flwr supernode register``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedswarm.common.errors import InputError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path


def make_node_key(out: str | Path, name: str = "node") -> NodeKey:
    """Write ``NAME`` (private) and ``NAME.pub`` (public) under ``out``; refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not NAME.match(name):
        raise InputError(f"--name must be letters, digits, '_', '.', '-' (up to 64), got {name!r}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    keys = NodeKey(root / name, root / f"{name}.pub")
    for path in (keys.private, keys.public):
        if path.exists():
            raise InputError(f"--out {out}: {path.name} already exists; remove it or choose another --name")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys.private.write_bytes(b"")
    keys.private.chmod(0o600)
    keys.private.write_bytes(private)
    keys.public.write_bytes(public + f" fedswarm-{name}\n".encode())
    return keys
