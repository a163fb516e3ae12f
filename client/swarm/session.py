"""Inference sessions: hidden states streamed hop by hop, KV caches kept on the servers.

Each hop remembers every input it was sent. When a hop fails, the session bans its server,
plans a replacement for exactly that hop's blocks, replays the remembered inputs through the
replacement to rebuild its cache, and carries on; the hops before and after keep their caches,
and the caller sees the same outputs it would have seen without the failure.

A session uses one version of one unmerged adapter (or the base) on every hop, from its first
token to its last. If a server replaced that adapter before the session's first step reached
it, the session re-plans from scratch on the version the swarm now serves; later, a replacement
hop must still run the pinned version, or the session fails with a clear error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedswarm.client.swarm.discovery import AdapterVersion
from fedswarm.client.swarm.failures import (
    MAX_ATTEMPTS,
    backoff_s,
    describe,
    fatal_error,
    is_retriable,
    is_stale_adapter,
)
from fedswarm.client.swarm.routing import Hop, format_blocks
from fedswarm.common.errors import FedswarmError
from fedswarm.protos import swarm_pb2
from fedswarm.protos.tensors import PROTOCOL_VERSION, from_proto, to_proto

if TYPE_CHECKING:
    import torch

    from fedswarm.client.swarm.client import SwarmClient

log = logging.getLogger("fedswarm.swarm.session")

STEP_TIMEOUT_S = 60.0  # one step on one server; a slower server is treated as failed


class _Stream:
    """One server's side of a session: a bidirectional stream fed from a queue."""

    def __init__(
        self, client: SwarmClient, hop: Hop, max_length: int, session_id: str, version: AdapterVersion
    ) -> None:
        self.hop = hop
        self._first: swarm_pb2.InferenceRequest | None = swarm_pb2.InferenceRequest(
            protocol_version=PROTOCOL_VERSION,
            start=hop.start,
            end=hop.end,
            max_length=max_length,
            session_id=session_id,
            adapter=version.name,
            adapter_digest=version.digest if version.name else "",
        )
        self._requests: queue.Queue[swarm_pb2.InferenceRequest | None] = queue.Queue()
        self._replies = client.stub(hop.address).Inference(
            iter(self._requests.get, None), metadata=client.security.metadata()
        )
        self.busy_since: float | None = None  # set while a step waits for its reply
        self.compute_ms = 0.0  # server-side time of the last step
        self.batch_size = 0  # rows the server computed together in the last step (its continuous batching)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        request = swarm_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, hidden=to_proto(hidden))
        if self._first is not None:
            request.MergeFrom(self._first)
            self._first = None
        self.busy_since = time.monotonic()
        try:
            self._requests.put(request)
            reply = next(self._replies, None)
        finally:
            self.busy_since = None
        if reply is None:
            raise ConnectionError(f"server {self.hop.address} ended the session")
        self.compute_ms = reply.compute_ms
        self.batch_size = reply.batch_size
        return from_proto(reply.hidden)

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()


@dataclass
class _Link:
    """A hop of the live route: its stream and every input it has received (for replays)."""

    stream: _Stream
    inputs: list[Any] = field(default_factory=list)

    @property
    def hop(self) -> Hop:
        return self.stream.hop


class InferenceSession:
    """A generation's route through the swarm, with per-server KV caches of ``max_length`` tokens.

    ``adapter`` names the unmerged adapter to use ("" the base; default: the client's).
    """

    def __init__(self, client: SwarmClient, max_length: int, adapter: str | None = None) -> None:
        self.client = client
        self.max_length = max_length
        self.session_id = f"{id(self):x}-{time.time_ns():x}"
        self.length = 0  # tokens sent so far
        self.adapter = client.adapter if adapter is None else adapter
        self.version = client.adapter_version(self.adapter)  # pinned for the whole session
        self._excluded: set[str] = set()  # servers that no longer run the pinned version
        self.links = [_Link(self._open(hop)) for hop in client.plan(version=self.version)]
        self._closed = threading.Event()
        threading.Thread(target=self._watchdog, name="session-watchdog", daemon=True).start()

    @property
    def route(self) -> list[Hop]:
        return [link.hop for link in self.links]

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send new tokens' embeddings ([batch, new, hidden]) through every block; returns the last block's output."""
        if self.length + hidden.shape[1] > self.max_length:
            raise FedswarmError(f"session holds {self.length} tokens; {hidden.shape[1]} more exceed {self.max_length}")
        for address in self.client.unlisted(hop.address for hop in self.route):  # e.g. denied by the registry
            index = next(i for i, link in enumerate(self.links) if link.hop.address == address)
            self._replace(index, ConnectionError(f"server {address} is no longer listed by the registries"))
        x = hidden
        index = 0
        while index < len(self.links):
            link = self.links[index]
            try:
                out = link.stream.step(x)
            except Exception as exc:  # noqa: BLE001 (grpc raises RpcError subclasses and iterator errors)
                if not is_retriable(exc):
                    raise fatal_error(link.hop.address, exc) from None
                if is_stale_adapter(exc) and self.length == 0:
                    self._restart(link.hop.address, exc)
                    x, index = hidden, 0
                    continue
                self._replace(index, exc)
                continue
            link.inputs.append(x)
            x = out
            index += 1
        self.length += hidden.shape[1]
        return x

    def server_ms(self) -> float:
        """Server-side compute of the last step, summed over hops (to separate network from compute)."""
        return sum(link.stream.compute_ms for link in self.links)

    def close(self) -> None:
        self._closed.set()
        for link in self.links:
            link.stream.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, hop: Hop) -> _Stream:
        return _Stream(self.client, hop, self.max_length, self.session_id, self.version)

    def _restart(self, address: str, error: BaseException) -> None:
        """Before the first step has gone through, re-plan the whole route on the adapter's current version."""
        log.info("server %s: %s; re-planning on the current version", address, describe(error))
        for link in self.links:
            link.stream.close()
        for attempt in range(MAX_ATTEMPTS):
            time.sleep(backoff_s(attempt))
            self.client.try_refresh()
            try:
                version = self.client.adapter_version(self.adapter)
                plan = self.client.plan(version=version)
            except FedswarmError as exc:  # servers half-way through the replacement: none covers all blocks yet
                log.info("waiting for the swarm to agree on adapter %r: %s", self.adapter, exc)
                continue
            if version == self.version:  # the registry has not heard of the new version yet
                continue
            self.version = version
            self.links = [_Link(self._open(hop)) for hop in plan]
            return
        raise FedswarmError(f"adapter {self.adapter!r}: the swarm did not settle on one version")

    def _replace(self, index: int, error: BaseException) -> None:
        """Swap the failed hop for servers covering its blocks, and rebuild their caches."""
        failed = self.links[index]
        start, end = failed.hop.start, failed.hop.end
        failed.stream.close()
        if is_stale_adapter(error):  # alive, but no longer runs this session's version
            self._excluded.add(failed.hop.address)
        else:
            self.client.ban(failed.hop.address)
        log.warning(
            "server %s failed on %s (%s); re-routing", failed.hop.address, format_blocks(start, end), describe(error)
        )
        history = _concat(failed.inputs)
        for attempt in range(MAX_ATTEMPTS):
            time.sleep(backoff_s(attempt))
            self.client.try_refresh()
            plan = self.client.plan(start, end, self.version, self._excluded)  # NoRouteError names the gap
            links = [_Link(self._open(hop)) for hop in plan]
            current = links[0]
            try:
                x = history
                for current in links:
                    if x is not None:
                        current.inputs.append(x)
                        x = current.stream.step(x)
            except Exception as exc:  # noqa: BLE001
                for link in links:
                    link.stream.close()
                if not is_retriable(exc):
                    raise fatal_error(current.hop.address, exc) from None
                if is_stale_adapter(exc):
                    self._excluded.add(current.hop.address)
                else:
                    self.client.ban(current.hop.address)
                continue
            self.links[index : index + 1] = links
            self.client.replays += 1
            log.info("re-routed %s via %s", format_blocks(start, end), ", ".join(h.address for h in self.route))
            return
        raise FedswarmError(f"gave up re-routing {format_blocks(start, end)} after {MAX_ATTEMPTS} attempts")

    def _watchdog(self) -> None:
        """Cancel a stream whose step takes longer than STEP_TIMEOUT_S, so a hung server counts as failed."""
        while not self._closed.wait(1.0):
            now = time.monotonic()
            for link in list(self.links):
                since = link.stream.busy_since
                if since is not None and now - since > STEP_TIMEOUT_S:
                    log.warning("server %s silent for %.0f s", link.hop.address, now - since)
                    link.stream.close()


def _concat(inputs: list[Any]) -> Any:
    import torch

    return torch.cat(inputs, dim=1) if inputs else None
