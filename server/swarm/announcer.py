"""Keeping a server's registry entries alive: announce to every registry, refresh before the TTL lapses.

A registry that is down is retried with exponential backoff (logged at WARNING with the
delay) while the others keep being refreshed; the server goes on serving regardless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from fedswarm.common.security.transport import Security, open_channel
from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION

log = logging.getLogger("fedswarm.swarm.announcer")

MAX_BACKOFF_S = 30.0


class Announcer:
    """A background thread announcing ``info`` to each registry every ``ttl_s / 3`` seconds."""

    def __init__(self, registries: Sequence[str], info: swarm_pb2.ServerInfo, ttl_s: float, security: Security) -> None:
        self.registries = list(registries)
        self.info = info
        self.ttl_s = ttl_s
        self.security = security
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._changed = threading.Condition()
        self._generation = 0  # bumped by update(): each registry's loop announces at once

    def update(self, info: swarm_pb2.ServerInfo) -> None:
        """Announce ``info`` from now on, starting now (e.g. an adapter's new version)."""
        with self._changed:
            self.info = info
            self._generation += 1
            self._changed.notify_all()

    def announce_once(self, registry: str, ttl_s: float, timeout_s: float = 5.0) -> None:
        """One announcement (``ttl_s`` 0 withdraws); raises ``grpc.RpcError`` on failure."""
        channel = open_channel(registry, self.security)
        try:
            stub = swarm_pb2_grpc.RegistryStub(channel)
            request = swarm_pb2.AnnounceRequest(protocol_version=PROTOCOL_VERSION, server=self.info, ttl_s=ttl_s)
            stub.Announce(request, timeout=timeout_s, metadata=self.security.metadata())
        finally:
            channel.close()

    def start(self) -> None:
        for registry in self.registries:
            thread = threading.Thread(target=self._loop, args=(registry,), name=f"announce-{registry}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop refreshing and withdraw the entries, so clients stop routing here at once."""
        import grpc

        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        for registry in self.registries:
            try:
                self.announce_once(registry, 0.0, timeout_s=1.0)  # best effort: the TTL cleans up anyway
            except grpc.RpcError:
                pass

    def _wait_change(self, generation: int) -> None:
        """Until the next refresh is due, ``update`` brings new info, or ``stop`` is called."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != generation or self._stop.is_set(), self.ttl_s / 3)

    def _loop(self, registry: str) -> None:
        import grpc

        delay = 1.0
        while not self._stop.is_set():
            generation = self._generation
            try:
                self.announce_once(registry, self.ttl_s)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    log.error("registry %s refused this server: %s; retrying in %.0f s", registry, exc.details(), delay)
                else:
                    log.warning("registry %s unreachable (%s); retrying in %.0f s", registry, exc.code().name, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            delay = 1.0
            self._wait_change(generation)
