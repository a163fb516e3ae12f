"""The registry: which block servers are alive, what they hold, how fast they are, and who they are.

Entries are soft state: a server's announcement lapses after its time-to-live unless it
refreshes it, so a crashed server disappears without anyone telling the registry. Several
registries can run side by side; servers announce to each and clients merge their lists.

With mutual TLS (the default), an announcement is accepted only from a server certificate of the
federation's CA that names the announced address's host; the entry is listed with that identity
(certificate fingerprint and name), only that identity may refresh or withdraw it, each identity's
announcements are rate-limited, and ``--deny`` drops and refuses an identity at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedswarm.common.errors import FedswarmError
from fedswarm.common.security.identity import Identity, normalise_fingerprint, peer_identity
from fedswarm.common.security.transport import Security, bind_server, server_interceptors
from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION

log = logging.getLogger("fedswarm.swarm.registry")

MAX_TTL_S = 600.0  # longest time-to-live an announcement may ask for
MAX_ENTRIES = 10_000  # bounds the registry's memory against a flood of announcements
MAX_ENTRIES_PER_IDENTITY = 64  # addresses one certificate may hold at once
MAX_ADAPTERS = 1_000  # unmerged adapters one server may announce
ANNOUNCE_BURST = 20  # announcements one identity may make at once ...
ANNOUNCE_RATE = 2.0  # ... and per second after that (a server refreshes every ttl/3 s, ~0.2/s)


class RefusedError(Exception):
    """An announcement the registry will not store; ``kind`` says why (for the gRPC status)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "denied", "forbidden", "flood", "full"


@dataclass
class _Entry:
    info: swarm_pb2.ServerInfo
    expiry: float
    owner: str  # fingerprint of the announcing certificate ("" without TLS)


class DenyList:
    """Fingerprints refused by the registry: given at start, plus a file re-read whenever it changes.

    A file line is one SHA-256 fingerprint (hex, colons allowed); blank lines and ``#`` comments are
    skipped. A bad line in a changed file is logged and skipped; the rest of the file still applies.
    """

    def __init__(self, fingerprints: Iterable[str] = (), path: Path | None = None) -> None:
        self._fixed = {normalise_fingerprint(f) for f in fingerprints}
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._from_file: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        if path is not None:
            if not path.is_file():
                raise FedswarmError(f"--deny-file {path}: no such file")
            self._from_file = self._read(path, strict=True)
            self._stamp = _stamp(path)

    def current(self) -> frozenset[str]:
        with self._lock:
            if self._path is not None:
                stamp = _stamp(self._path)
                if stamp != self._stamp:
                    self._stamp = stamp
                    self._from_file = self._read(self._path, strict=False) if stamp else frozenset()
                    log.info("deny list %s re-read: %d fingerprints", self._path, len(self._from_file))
            return frozenset(self._fixed | self._from_file)

    @staticmethod
    def _read(path: Path, strict: bool) -> frozenset[str]:
        found = set()
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                found.add(normalise_fingerprint(line))
            except ValueError as exc:
                if strict:
                    raise FedswarmError(f"--deny-file {path} line {number}: {exc}") from None
                log.error("deny list %s line %d skipped: %s", path, number, exc)
        return frozenset(found)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None  # a deleted file denies nothing more than the fixed list
    return stat.st_mtime_ns, stat.st_size


class RegistryTable:
    """Live announcements keyed by server address; thread-safe, with an injectable clock for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, deny: DenyList | None = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, last refill time)
        self.deny = deny or DenyList()

    def announce(self, info: swarm_pb2.ServerInfo, ttl_s: float, identity: Identity | None = None) -> None:
        """Store (``ttl_s`` > 0) or withdraw ``info``; raises ``RefusedError``."""
        owner = identity.fingerprint if identity else ""
        with self._lock:
            self._expire()
            denied = self.deny.current()
            self._drop(denied)
            if owner in denied:
                raise RefusedError("denied", f"certificate {identity.name!r} ({owner}) is denied")  # type: ignore[union-attr]
            self._take_token(owner or f"address {info.address}")  # without TLS, no identity: per address
            held = self._entries.get(info.address)
            if held is not None and held.owner != owner:
                raise RefusedError(
                    "forbidden",
                    f"{info.address} is announced by another certificate until its entry lapses "
                    f"(in {held.expiry - self._clock():.0f} s)",
                )
            if ttl_s <= 0:
                self._entries.pop(info.address, None)
                return
            if held is None:
                if len(self._entries) >= MAX_ENTRIES:
                    raise RefusedError("full", f"registry full ({MAX_ENTRIES} servers)")
                if owner and sum(e.owner == owner for e in self._entries.values()) >= MAX_ENTRIES_PER_IDENTITY:
                    raise RefusedError("full", f"one certificate may hold at most {MAX_ENTRIES_PER_IDENTITY} entries")
            stored = swarm_pb2.ServerInfo()
            stored.CopyFrom(info)
            stored.identity = owner
            stored.identity_name = identity.name if identity else ""
            self._entries[info.address] = _Entry(stored, self._clock() + min(ttl_s, MAX_TTL_S), owner)

    def live(self, model_id: str = "") -> list[swarm_pb2.ServerInfo]:
        """Unexpired, undenied entries (of ``model_id`` if given), each stamped with its remaining lifetime."""
        with self._lock:
            self._expire()
            self._drop(self.deny.current())
            now = self._clock()
            out = []
            for entry in sorted(self._entries.values(), key=lambda e: e.info.address):
                if model_id and entry.info.model_id != model_id:
                    continue
                copy = swarm_pb2.ServerInfo()
                copy.CopyFrom(entry.info)
                copy.expires_in_s = entry.expiry - now
                out.append(copy)
            return out

    def _take_token(self, owner: str) -> None:
        """A token bucket per identity (``owner``): ANNOUNCE_BURST at once, ANNOUNCE_RATE per second after."""
        now = self._clock()
        tokens, last = self._buckets.get(owner, (float(ANNOUNCE_BURST), now))
        tokens = min(float(ANNOUNCE_BURST), tokens + (now - last) * ANNOUNCE_RATE)
        if tokens < 1.0:
            self._buckets[owner] = (tokens, now)
            raise RefusedError("flood", f"too many announcements (at most {ANNOUNCE_RATE:g}/s); retry later")
        self._buckets[owner] = (tokens - 1.0, now)
        if len(self._buckets) > 4 * MAX_ENTRIES:  # forget identities whose buckets have refilled
            full = now - ANNOUNCE_BURST / ANNOUNCE_RATE
            self._buckets = {o: (t, s) for o, (t, s) in self._buckets.items() if s > full}

    def _drop(self, denied: frozenset[str]) -> None:
        for address in [a for a, e in self._entries.items() if e.owner and e.owner in denied]:
            entry = self._entries.pop(address)
            log.warning("dropped %s: certificate %r (%s) is denied", address, entry.info.identity_name, entry.owner)

    def _expire(self) -> None:
        now = self._clock()
        for address in [a for a, entry in self._entries.items() if entry.expiry <= now]:
            del self._entries[address]


class RegistryServicer(swarm_pb2_grpc.RegistryServicer):
    """The gRPC face of :class:`RegistryTable`: checks each announcement (and, with ``require_identity``,
    the announcing certificate) before storing it."""

    def __init__(self, table: RegistryTable, require_identity: bool = False) -> None:
        self.table = table
        self.require_identity = require_identity

    def Announce(self, request: swarm_pb2.AnnounceRequest, context: Any) -> swarm_pb2.AnnounceReply:  # noqa: N802
        import grpc

        _check_version(request.protocol_version, context)
        info = request.server
        problem = _invalid(info)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        identity = None
        if self.require_identity:
            identity = peer_identity(context)
            problem = _unauthorised(identity, info.address)
            if problem:
                log.warning("refused announcement of %s from %s: %s", info.address, context.peer(), problem)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        try:
            self.table.announce(info, request.ttl_s, identity)
        except RefusedError as exc:
            log.warning("refused announcement of %s from %s: %s", info.address, context.peer(), exc)
            status = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if exc.kind in ("flood", "full")
                else grpc.StatusCode.PERMISSION_DENIED
            )
            context.abort(status, str(exc))
        log.debug("announce %s blocks %d:%d ttl %.0fs", info.address, info.start, info.end, request.ttl_s)
        return swarm_pb2.AnnounceReply(protocol_version=PROTOCOL_VERSION)

    def List(self, request: swarm_pb2.ListRequest, context: Any) -> swarm_pb2.ListReply:  # noqa: N802
        _check_version(request.protocol_version, context)
        return swarm_pb2.ListReply(protocol_version=PROTOCOL_VERSION, servers=self.table.live(request.model_id))


def _unauthorised(identity: Identity | None, address: str) -> str:
    """Why this certificate may not announce ``address`` ("" if it may)."""
    if identity is None:
        return "announcing needs a server certificate from the federation's CA"
    if not identity.may_serve:
        return f"certificate {identity.name!r} is a client certificate: only server certificates announce"
    host = address.rsplit(":", 1)[0]
    if not identity.covers(host):
        names = ", ".join(sorted(identity.hosts)) or "no host"
        return f"certificate {identity.name!r} names {names}, not {host} (the announced address {address})"
    return ""


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


def start_registry(
    host: str, port: int, security: Security, deny: DenyList | None = None, client_port: int | None = None
) -> tuple[Any, int, int | None]:
    """Start a registry server in this process; returns the gRPC server, its bound port, and the bound
    ``client_port`` (TLS without client certificates: clients list with the token; nobody can announce)."""
    import dataclasses

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=server_interceptors(security))
    servicer = RegistryServicer(RegistryTable(deny=deny), require_identity=security.tls_cert is not None)
    swarm_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    bound = bind_server(server, host, port, security)
    for_clients = None
    if client_port is not None:
        for_clients = bind_server(server, host, client_port, dataclasses.replace(security, client_certs=False))
    server.start()
    return server, bound, for_clients


def run_registry(
    host: str, port: int, security: Security, deny: DenyList | None = None, client_port: int | None = None
) -> int:
    """``fedswarm swarm registry``: serve until interrupted."""
    server, bound, for_clients = start_registry(host, port, security, deny, client_port)
    tls = "mutual TLS, server certificates checked" if security.tls_cert else "plaintext"
    auth = "token required" if security.token else "no token"
    log.info("registry listening on %s:%d (%s, %s)", host, bound, tls, auth)
    if for_clients is not None:
        log.info("clients with the token (no certificate) list on %s:%d", host, for_clients)
        print(f"registry client port {host}:{for_clients}", flush=True)
    print(f"registry ready on {host}:{bound}", flush=True)
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=1.0)
    return 0
