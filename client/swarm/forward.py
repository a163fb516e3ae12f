"""Stateless forward passes through the swarm (whole sequences, no cache): scoring, perplexity.

Failures are simple here: nothing is cached, so a failed hop is re-planned over its blocks
and the same hidden states are sent again.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fedswarm.client.swarm.failures import backoff_s, describe, fatal_error, is_retriable
from fedswarm.client.swarm.routing import Hop, format_blocks
from fedswarm.protos import swarm_pb2
from fedswarm.protos.tensors import PROTOCOL_VERSION, from_proto, to_proto

if TYPE_CHECKING:
    import torch

    from fedswarm.client.swarm.client import SwarmClient

log = logging.getLogger("fedswarm.swarm.forward")

FORWARD_TIMEOUT_S = 120.0


def forward_blocks(client: SwarmClient, hidden: torch.Tensor) -> torch.Tensor:
    """Run ``hidden`` ([batch, seq, hidden], positions from 0) through every block of the model."""
    pending = client.plan()
    x = hidden
    while pending:
        hop = pending.pop(0)
        try:
            x = _call(client, hop, x)
        except Exception as exc:  # noqa: BLE001 (grpc errors are RpcError subclasses)
            if not is_retriable(exc):
                raise fatal_error(hop.address, exc) from None
            pending = _replan(client, hop, exc) + pending
    return x


def _call(client: SwarmClient, hop: Hop, hidden: torch.Tensor) -> torch.Tensor:
    request = swarm_pb2.ForwardRequest(
        protocol_version=PROTOCOL_VERSION, start=hop.start, end=hop.end, hidden=to_proto(hidden)
    )
    reply = client.stub(hop.address).Forward(request, timeout=FORWARD_TIMEOUT_S, metadata=client.security.metadata())
    return from_proto(reply.hidden)


def _replan(client: SwarmClient, hop: Hop, error: BaseException) -> list[Hop]:
    client.ban(hop.address)
    log.warning(
        "server %s failed on %s (%s); re-routing", hop.address, format_blocks(hop.start, hop.end), describe(error)
    )
    time.sleep(backoff_s(0))
    client.try_refresh()
    return client.plan(hop.start, hop.end)  # each failure bans a server, so this ends in a route or NoRouteError
