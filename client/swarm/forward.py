"""Stateless forward passes through the swarm (whole sequences, no cache): scoring, perplexity.

Failures are simple here: nothing is cached, so a failed hop is re-planned over its blocks
and the same hidden states are sent again. One pass uses one version of its adapter; a server
that replaced the adapter meanwhile makes the whole pass start again on the new version.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

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

log = logging.getLogger("fedswarm.swarm.forward")

FORWARD_TIMEOUT_S = 120.0


def forward_blocks(client: SwarmClient, hidden: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
    """Run ``hidden`` ([batch, seq, hidden], positions from 0) through every block of the model,
    with the unmerged ``adapter`` ("" the base; default: the client's)."""
    for attempt in range(MAX_ATTEMPTS):
        version = client.adapter_version(adapter)
        try:
            return _forward(client, hidden, version)
        except _StaleAdapter as stale:
            log.info("%s; starting the pass again on the current version", stale)
            time.sleep(backoff_s(attempt))
            client.try_refresh()
    raise FedswarmError(f"adapter {version.name!r}: the swarm did not settle on one version")


class _StaleAdapter(Exception):
    """A server on the route runs a newer version of the pass's adapter."""


def _forward(client: SwarmClient, hidden: torch.Tensor, version: AdapterVersion) -> torch.Tensor:
    pending = client.plan(version=version)
    x = hidden
    while pending:
        hop = pending.pop(0)
        try:
            x = _call(client, hop, x, version)
        except Exception as exc:  # noqa: BLE001 (grpc errors are RpcError subclasses)
            if not is_retriable(exc):
                raise fatal_error(hop.address, exc) from None
            if is_stale_adapter(exc):
                raise _StaleAdapter(f"server {hop.address}: {describe(exc)}") from None
            pending = _replan(client, hop, exc, version) + pending
    return x


def _call(client: SwarmClient, hop: Hop, hidden: torch.Tensor, version: AdapterVersion) -> torch.Tensor:
    request = swarm_pb2.ForwardRequest(
        protocol_version=PROTOCOL_VERSION,
        start=hop.start,
        end=hop.end,
        hidden=to_proto(hidden),
        adapter=version.name,
        adapter_digest=version.digest if version.name else "",
    )
    reply = client.stub(hop.address).Forward(request, timeout=FORWARD_TIMEOUT_S, metadata=client.security.metadata())
    return from_proto(reply.hidden)


def _replan(client: SwarmClient, hop: Hop, error: BaseException, version: AdapterVersion) -> list[Hop]:
    client.ban(hop.address)
    log.warning(
        "server %s failed on %s (%s); re-routing", hop.address, format_blocks(hop.start, hop.end), describe(error)
    )
    time.sleep(backoff_s(0))
    client.try_refresh()
    return client.plan(hop.start, hop.end, version)  # each failure bans a server: a route or NoRouteError
