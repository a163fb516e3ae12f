"""The client's view of the swarm: live servers, temporary bans, planned routes, channels.

Bans are per process and temporary: a failed server is skipped for ``ban_s`` seconds, long
enough to route around it, short enough that a restarted server is used again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from fedswarm.client.swarm.discovery import (
    AdapterVersion,
    Swarm,
    adapter_names,
    choose_swarm,
    choose_version,
    list_servers,
    serves,
)
from fedswarm.client.swarm.routing import DEFAULT_HOP_OVERHEAD_S, Hop, NoRouteError, Peer, plan_route
from fedswarm.common.security.transport import Security, open_channel
from fedswarm.protos import swarm_pb2_grpc

log = logging.getLogger("fedswarm.swarm.client")


class SwarmClient:
    """Discovery, bans and routing for one model and merged adapter; channels are reused per server.

    Unmerged adapters are chosen per generation (``adapter``: the default name, "" the base).
    """

    def __init__(
        self,
        registries: Sequence[str],
        security: Security | None = None,
        model_id: str = "",
        adapter_id: str | None = None,
        ban_s: float = 60.0,
        hop_overhead_s: float = DEFAULT_HOP_OVERHEAD_S,
        adapter: str = "",
        relist_s: float = 5.0,
    ) -> None:
        self.registries = list(registries)
        self.adapter = adapter  # unmerged adapter used when a generation names none
        self.security = security or Security()
        self.ban_s = ban_s  # how long a failed server is skipped, seconds
        self.hop_overhead_s = hop_overhead_s  # planning estimate of one hop's network cost, seconds
        self._banned: dict[str, float] = {}  # address -> monotonic time the ban ends
        self._channels: dict[str, Any] = {}
        self.replays = 0  # hops re-routed and replayed after a server failed (for metrics)
        self.relist_s = relist_s  # how often a generation re-reads the registries to drop servers that left
        self._listed_at = 0.0
        self.swarm: Swarm = self.refresh(model_id, adapter_id)

    def refresh(self, model_id: str | None = None, adapter_id: str | None = None) -> Swarm:
        """Re-read the registries (keeping the model and adapter chosen at the start)."""
        if hasattr(self, "swarm"):
            model_id, adapter_id = self.swarm.model_id, self.swarm.adapter_id
        self.swarm = choose_swarm(list_servers(self.registries, self.security), model_id or "", adapter_id)
        self._listed_at = time.monotonic()
        return self.swarm

    def try_refresh(self) -> None:
        """Refresh while recovering from a failure: a registry hiccup must not end a generation
        that the servers already listed could still finish."""
        from fedswarm.common.errors import FedswarmError

        try:
            self.refresh()
        except FedswarmError as exc:
            log.warning("keeping the last server list: %s", exc)

    def unlisted(self, addresses: Iterable[str]) -> set[str]:
        """Which of ``addresses`` the registries no longer list (withdrawn, lapsed, or denied), re-reading
        them at most every ``relist_s`` seconds; an unreachable registry changes nothing."""
        if time.monotonic() - self._listed_at >= self.relist_s:
            self._listed_at = time.monotonic()  # a failing registry is not asked again at every step
            self.try_refresh()
        listed = {info.address for info in self.swarm.servers}
        return {address for address in addresses if address not in listed}

    @property
    def num_blocks(self) -> int:
        return self.swarm.num_blocks

    def ban(self, address: str) -> None:
        log.warning("banning server %s for %.0f s", address, self.ban_s)
        self._banned[address] = time.monotonic() + self.ban_s
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def banned(self) -> set[str]:
        now = time.monotonic()
        self._banned = {a: until for a, until in self._banned.items() if until > now}
        return set(self._banned)

    def adapter_names(self) -> list[str]:
        """The unmerged adapters live servers announce (each usable as ``adapter``)."""
        return adapter_names(self.swarm.servers)

    def adapter_version(self, name: str | None = None) -> AdapterVersion:
        """The version of adapter ``name`` (default: ``self.adapter``) a new generation should use."""
        name = self.adapter if name is None else name
        return choose_version(self.swarm.servers, name, 0, self.num_blocks, self.banned())

    def plan(
        self,
        start: int = 0,
        end: int | None = None,
        version: AdapterVersion | None = None,
        exclude: Iterable[str] = (),
    ) -> list[Hop]:
        """A route over blocks ``start..end-1`` among live, unbanned servers that run ``version``
        (default: the base model), avoiding the ``exclude``d addresses too."""
        version = version or AdapterVersion()
        peers = [Peer(s.address, s.start, s.end, s.throughput) for s in self.swarm.servers if serves(s, version)]
        avoid = self.banned() | set(exclude)
        try:
            return plan_route(peers, start, self.num_blocks if end is None else end, avoid, self.hop_overhead_s)
        except NoRouteError as exc:
            if not version.name:
                raise
            what = f"adapter {version.name!r} version {version.digest}"  # e.g. every server moved to a newer one
            raise NoRouteError(exc.missing, avoid & {p.address for p in peers}, what=what) from None

    def stub(self, address: str) -> swarm_pb2_grpc.BlockServerStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.security)
        return swarm_pb2_grpc.BlockServerStub(channel)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
