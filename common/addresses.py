"""Command-line addresses shared by the swarm's servers and clients."""

from __future__ import annotations

from collections.abc import Sequence


def registries_arg(values: Sequence[str]) -> tuple[str, ...]:
    """``--registry`` may repeat or hold a comma list; each entry must be host:port."""
    from fedswarm.common.errors import FedswarmError

    out = tuple(a.strip() for value in values for a in value.split(",") if a.strip())
    for address in out:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise FedswarmError(f"--registry {address!r}: expected HOST:PORT")
    if not out:
        raise FedswarmError("--registry: give at least one HOST:PORT")
    return out
