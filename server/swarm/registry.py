"""The registry: which block servers are alive, what they hold, how fast they are.

Entries are soft state: a server's announcement lapses after its time-to-live unless it
refreshes it, so a crashed server disappears without anyone telling the registry. Several
registries can run side by side; servers announce to each and clients merge their lists.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Any

from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION
from fedswarm.protos.transport import Security, bind_server, server_interceptors

log = logging.getLogger("fedswarm.swarm.registry")

MAX_TTL_S = 600.0  # longest time-to-live an announcement may ask for
MAX_ENTRIES = 10_000  # bounds the registry's memory against a flood of announcements
MAX_ADAPTERS = 1_000  # unmerged adapters one server may announce


class RegistryTable:
    """Live announcements keyed by server address; thread-safe, with an injectable clock for tests."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[swarm_pb2.ServerInfo, float]] = {}

    def announce(self, info: swarm_pb2.ServerInfo, ttl_s: float) -> None:
        with self._lock:
            self._expire()
            if ttl_s <= 0:
                self._entries.pop(info.address, None)
                return
            if info.address not in self._entries and len(self._entries) >= MAX_ENTRIES:
                raise ValueError(f"registry full ({MAX_ENTRIES} servers)")
            stored = swarm_pb2.ServerInfo()
            stored.CopyFrom(info)
            self._entries[info.address] = (stored, self._clock() + min(ttl_s, MAX_TTL_S))

    def live(self, model_id: str = "") -> list[swarm_pb2.ServerInfo]:
        """Unexpired entries (of ``model_id`` if given), each stamped with its remaining lifetime."""
        with self._lock:
            self._expire()
            now = self._clock()
            out = []
            for info, expiry in sorted(self._entries.values(), key=lambda e: e[0].address):
                if model_id and info.model_id != model_id:
                    continue
                copy = swarm_pb2.ServerInfo()
                copy.CopyFrom(info)
                copy.expires_in_s = expiry - now
                out.append(copy)
            return out

    def _expire(self) -> None:
        now = self._clock()
        for address in [a for a, (_, expiry) in self._entries.items() if expiry <= now]:
            del self._entries[address]


class RegistryServicer(swarm_pb2_grpc.RegistryServicer):
    """The gRPC face of :class:`RegistryTable`; validates announcements before storing them."""

    def __init__(self, table: RegistryTable) -> None:
        self.table = table

    def Announce(self, request: swarm_pb2.AnnounceRequest, context: Any) -> swarm_pb2.AnnounceReply:  # noqa: N802
        import grpc

        _check_version(request.protocol_version, context)
        info = request.server
        problem = _invalid(info)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            self.table.announce(info, request.ttl_s)
        except ValueError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        log.debug("announce %s blocks %d:%d ttl %.0fs", info.address, info.start, info.end, request.ttl_s)
        return swarm_pb2.AnnounceReply(protocol_version=PROTOCOL_VERSION)

    def List(self, request: swarm_pb2.ListRequest, context: Any) -> swarm_pb2.ListReply:  # noqa: N802
        _check_version(request.protocol_version, context)
        return swarm_pb2.ListReply(protocol_version=PROTOCOL_VERSION, servers=self.table.live(request.model_id))


def _invalid(info: swarm_pb2.ServerInfo) -> str:
    if not info.address or ":" not in info.address:
        return f"server address {info.address!r} is not host:port"
    if not info.model_id:
        return "server announced no model id"
    if not 0 <= info.start < info.end <= max(info.num_blocks, 0):
        return f"block span {info.start}:{info.end} is not inside 0:{info.num_blocks}"
    if not info.throughput > 0:
        return f"throughput {info.throughput} must be positive"
    names = [adapter.name for adapter in info.adapters]
    if len(names) > MAX_ADAPTERS:
        return f"{len(names)} adapters announced, at most {MAX_ADAPTERS}"
    if "" in names or len(set(names)) != len(names):
        return "adapter names must be non-empty and unique"
    return ""


def _check_version(version: int, context: Any) -> None:
    import grpc

    if version != PROTOCOL_VERSION:
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {version} is not supported; this peer speaks {PROTOCOL_VERSION}",
        )


def start_registry(host: str, port: int, security: Security) -> tuple[Any, int]:
    """Start a registry server in this process; returns the gRPC server and its bound port."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=server_interceptors(security))
    swarm_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(RegistryTable()), server)
    bound = bind_server(server, host, port, security)
    server.start()
    return server, bound


def run_registry(host: str, port: int, security: Security) -> int:
    """``fedswarm swarm registry``: serve until interrupted."""
    server, bound = start_registry(host, port, security)
    tls = "TLS" if security.tls_cert else "plaintext"
    auth = "token required" if security.token else "no token"
    log.info("registry listening on %s:%d (%s, %s)", host, bound, tls, auth)
    print(f"registry ready on {host}:{bound}", flush=True)
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=1.0)
    return 0
