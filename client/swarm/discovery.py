"""Finding the swarm: merge the registries' lists, and pick one model, adapter and adapter version.

A client must never route one forward pass through servers of different models or adapters
(the output would be garbage, silently), so disagreement is an error unless the user chose.
Merged adapters (``adapter_id``) split the swarm into groups; unmerged ones are chosen per
generation by name, and pinned to one version (digest) that servers covering every block agree on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedswarm.client.swarm.routing import NoRouteError, Peer, missing_blocks
from fedswarm.common.errors import FedswarmError
from fedswarm.common.registry_listing import list_registries
from fedswarm.common.security.transport import Security
from fedswarm.protos import swarm_pb2

log = logging.getLogger("fedswarm.swarm.discovery")


@dataclass(frozen=True)
class Swarm:
    """The servers of one (model, adapter) pair."""

    model_id: str
    adapter_id: str
    num_blocks: int
    servers: tuple[swarm_pb2.ServerInfo, ...]


@dataclass(frozen=True)
class AdapterVersion:
    """An unmerged adapter in one version; ``name`` "" is the base model (whatever the digest)."""

    name: str = ""
    digest: str = ""


class UnknownAdapterError(FedswarmError):
    """No live server announces an adapter of this name."""


def serves(info: swarm_pb2.ServerInfo, version: AdapterVersion) -> bool:
    """Whether the server can run ``version`` (every server runs the base model)."""
    if not version.name:
        return True
    return any(a.name == version.name and a.digest == version.digest for a in info.adapters)


def adapter_names(servers: Sequence[swarm_pb2.ServerInfo]) -> list[str]:
    """Every unmerged adapter name some server announces."""
    return sorted({a.name for info in servers for a in info.adapters})


def choose_version(
    servers: Sequence[swarm_pb2.ServerInfo], name: str, start: int, end: int, banned: Iterable[str] = ()
) -> AdapterVersion:
    """The version of adapter ``name`` to route a generation through: one whose servers cover
    blocks ``start..end-1``; of several, the one the most servers announce (then the smaller
    digest, so every client picks the same). While an adapter is being replaced the swarm may
    announce two versions; a generation uses exactly one of them from its first token to its last.
    """
    if not name:
        return AdapterVersion()
    banned = set(banned)
    holders: dict[str, list[swarm_pb2.ServerInfo]] = {}
    for info in servers:
        for adapter in info.adapters:
            if adapter.name == name and info.address not in banned:
                holders.setdefault(adapter.digest, []).append(info)
    if not holders:
        known = ", ".join(adapter_names(servers)) or "none"
        raise UnknownAdapterError(f"no live server serves adapter {name!r} (adapters served: {known})")
    gaps = {
        digest: missing_blocks([Peer(i.address, i.start, i.end, i.throughput) for i in infos], start, end)
        for digest, infos in holders.items()
    }
    complete = [digest for digest, missing in gaps.items() if not missing]
    if not complete:
        digest = min(gaps, key=lambda d: (sum(b - a for a, b in gaps[d]), d))
        raise NoRouteError(gaps[digest], banned, what=f"adapter {name!r} version {digest}")
    return AdapterVersion(name, min(complete, key=lambda d: (-len(holders[d]), d)))


def list_servers(registries: Sequence[str], security: Security) -> list[swarm_pb2.ServerInfo]:
    """Every live server any registry knows, one entry per address (the freshest wins)."""
    import grpc

    servers, failures = list_registries(registries, security)
    for registry, exc in failures:
        detail = exc.details() or exc.code().name
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise FedswarmError(f"registry {registry} refused the swarm token ({detail})") from None
        log.warning("registry %s unreachable: %s", registry, detail)
    if failures and len(failures) == len(registries):
        unreachable = ", ".join(f"{registry} ({exc.code().name})" for registry, exc in failures)
        raise FedswarmError(f"registry unreachable: {unreachable}")
    return servers


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
