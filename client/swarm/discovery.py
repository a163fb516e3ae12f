"""Finding the swarm: merge the registries' lists, and pick one model and adapter to use.

A client must never route one forward pass through servers of different models or adapters
(the output would be garbage, silently), so disagreement is an error unless the user chose.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fedswarm.common.errors import FedswarmError
from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION
from fedswarm.protos.transport import Security, open_channel

log = logging.getLogger("fedswarm.swarm.discovery")

REGISTRY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Swarm:
    """The servers of one (model, adapter) pair."""

    model_id: str
    adapter_id: str
    num_blocks: int
    servers: tuple[swarm_pb2.ServerInfo, ...]


def list_servers(registries: Sequence[str], security: Security) -> list[swarm_pb2.ServerInfo]:
    """Every live server any registry knows, one entry per address (the freshest wins)."""
    import grpc

    merged: dict[str, swarm_pb2.ServerInfo] = {}
    failures: list[str] = []
    for registry in registries:
        channel = open_channel(registry, security)
        try:
            stub = swarm_pb2_grpc.RegistryStub(channel)
            request = swarm_pb2.ListRequest(protocol_version=PROTOCOL_VERSION)
            reply = stub.List(request, timeout=REGISTRY_TIMEOUT_S, metadata=security.metadata())
        except grpc.RpcError as exc:
            detail = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise FedswarmError(f"registry {registry} refused the swarm token ({detail})") from None
            log.warning("registry %s unreachable: %s", registry, detail)
            failures.append(f"{registry} ({exc.code().name})")
            continue
        finally:
            channel.close()
        for info in reply.servers:
            known = merged.get(info.address)
            if known is None or info.expires_in_s > known.expires_in_s:
                merged[info.address] = info
    if failures and len(failures) == len(registries):
        raise FedswarmError(f"registry unreachable: {', '.join(failures)}")
    return [merged[a] for a in sorted(merged)]


def choose_swarm(servers: Sequence[swarm_pb2.ServerInfo], model_id: str = "", adapter_id: str | None = None) -> Swarm:
    """The servers of the requested model and adapter; infer them when the swarm is unanimous."""
    if not servers:
        raise FedswarmError("no block server is registered (are the servers running and announcing?)")
    groups: dict[tuple[str, str], list[swarm_pb2.ServerInfo]] = {}
    for info in servers:
        groups.setdefault((info.model_id, info.adapter_id), []).append(info)
    pairs = sorted(groups)
    if model_id:
        pairs = [p for p in pairs if p[0] == model_id]
        if not pairs:
            raise FedswarmError(f"no server serves model {model_id!r}; the registry lists {_describe(groups)}")
    if adapter_id is not None:
        pairs = [p for p in pairs if p[1] == adapter_id]
        if not pairs:
            raise FedswarmError(
                f"no server serves adapter {adapter_id or 'none'!r}; the registry lists {_describe(groups)}"
            )
    models = sorted({p[0] for p in pairs})
    if len(models) > 1:
        raise FedswarmError(f"servers disagree on the model: {_describe(groups)}; pass --model to choose one")
    if len(pairs) > 1:
        raise FedswarmError(f"servers disagree on the adapter: {_describe(groups)}; pass --adapter-id to choose one")
    chosen = groups[pairs[0]]
    sizes = sorted({info.num_blocks for info in chosen})
    if len(sizes) > 1:
        raise FedswarmError(f"servers of model {pairs[0][0]!r} disagree on its number of blocks: {sizes}")
    return Swarm(pairs[0][0], pairs[0][1], sizes[0], tuple(chosen))


def _describe(groups: dict[tuple[str, str], list[swarm_pb2.ServerInfo]]) -> str:
    parts = []
    for (model, adapter), infos in sorted(groups.items()):
        spans = ", ".join(f"{i.address} [{i.start}:{i.end}]" for i in infos)
        parts.append(f"model {model!r} adapter {adapter or 'none'!r} on {spans}")
    return "; ".join(parts)
