"""Reading the registries: every live server they list, one entry per address (the freshest wins).

Clients (to route) and ``--blocks auto`` servers (to place themselves) both read the swarm this
way; what a failed registry means is theirs to decide, so failures come back with the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedswarm.common.security.transport import Security, open_channel
from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION

REGISTRY_TIMEOUT_S = 5.0


def list_registries(
    registries: Sequence[str], security: Security, model_id: str = "", timeout_s: float = REGISTRY_TIMEOUT_S
) -> tuple[list[swarm_pb2.ServerInfo], list[tuple[str, Any]]]:
    """The servers every reachable registry lists (of ``model_id`` if given), sorted by address, and
    ``(registry, grpc.RpcError)`` for each registry that failed."""
    import grpc

    merged: dict[str, swarm_pb2.ServerInfo] = {}
    failures: list[tuple[str, Any]] = []
    for registry in registries:
        channel = open_channel(registry, security)
        try:
            stub = swarm_pb2_grpc.RegistryStub(channel)
            request = swarm_pb2.ListRequest(protocol_version=PROTOCOL_VERSION, model_id=model_id)
            reply = stub.List(request, timeout=timeout_s, metadata=security.metadata())
        except grpc.RpcError as exc:
            failures.append((registry, exc))
            continue
        finally:
            channel.close()
        for info in reply.servers:
            known = merged.get(info.address)
            if known is None or info.expires_in_s > known.expires_in_s:
                merged[info.address] = info
    return [merged[a] for a in sorted(merged)], failures
