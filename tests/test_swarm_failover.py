"""Stateless forward passes route around a failing server: in-process fakes for the servers."""

from __future__ import annotations

import functools

import grpc
import pytest
import torch

from fedswarm.client.swarm.discovery import AdapterVersion
from fedswarm.client.swarm.forward import forward_blocks
from fedswarm.client.swarm.routing import NoRouteError, Peer, plan_route
from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import parse_model
from fedswarm.common.security.transport import Security
from fedswarm.protos import swarm_pb2
from fedswarm.protos.tensors import from_proto, to_proto
from fedswarm.server.swarm.blocks import load_span
from tests.swarm_support import roundoff_tol


class _Down(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "fake failure"


class _Stub:
    def __init__(self, span, failure):
        self.span, self.failure = span, failure

    def Forward(self, request, timeout, metadata):  # noqa: N802
        if self.failure is not None:
            raise self.failure
        out = self.span.forward(from_proto(request.hidden), request.start, request.end)
        return swarm_pb2.ForwardReply(hidden=to_proto(out))


class FakeClient:
    """The parts of SwarmClient that forward_blocks uses, over in-process spans."""

    def __init__(self, servers: dict[str, tuple[int, int, float]], failing: dict[str, grpc.RpcError]):
        full = _full_span()
        self.spans = {a: full for a in servers}  # one span object answers any sub-range
        self.peers = [Peer(a, s, e, t) for a, (s, e, t) in servers.items()]
        self.failing = failing
        self.banned: set[str] = set()
        self.security = Security()

    def adapter_version(self, name=None):
        return AdapterVersion()

    def plan(self, start: int = 0, end: int | None = None, version=None, exclude=()):
        return plan_route(self.peers, start, 4 if end is None else end, self.banned | set(exclude))

    def stub(self, address):
        return _Stub(self.spans[address], self.failing.get(address))

    def ban(self, address):
        self.banned.add(address)

    def try_refresh(self):
        pass


SERVERS = {"a:1": (0, 2, 100.0), "fast:1": (2, 4, 1e6), "b:1": (2, 3, 100.0), "c:1": (3, 4, 100.0)}


@functools.cache
def _full_span():
    return load_span(parse_model("tiny"), 0, 4)


def _reference(x):
    return _full_span().forward(x, 0, 4)


def test_failed_hop_is_replanned_over_its_blocks_only():
    client = FakeClient(SERVERS, {"fast:1": _Down()})
    x = torch.randn(2, 5, 64)
    out = forward_blocks(client, x)
    assert client.banned == {"fast:1"}
    reference = _reference(x)
    assert (out - reference).abs().max() <= roundoff_tol(reference)


def test_no_replica_names_the_missing_blocks():
    client = FakeClient({k: v for k, v in SERVERS.items() if k in ("a:1", "fast:1")}, {"fast:1": _Down()})
    with pytest.raises(
        NoRouteError, match=r"no live server holds blocks 2-3 \(excluding 1 failed server\(s\): fast:1\)"
    ):
        forward_blocks(client, torch.randn(1, 3, 64))


def test_a_refusal_is_not_retried():
    client = FakeClient(SERVERS, {"a:1": _Down(grpc.StatusCode.INVALID_ARGUMENT)})
    with pytest.raises(FedswarmError, match=r"server a:1 refused the request \(INVALID_ARGUMENT: fake failure\)"):
        forward_blocks(client, torch.randn(1, 3, 64))
    assert client.banned == set()
