"""``--blocks auto`` around the placement rules: the start-up choice, the rebalance checks, and a move
with a session open (in this process, over real gRPC, on the tiny model)."""

from __future__ import annotations

import contextlib
import logging
import queue

import grpc
import pytest
import torch

from fedswarm.common.model import parse_model
from fedswarm.protos import swarm_pb2
from fedswarm.protos.tensors import PROTOCOL_VERSION, from_proto, to_proto
from fedswarm.server.swarm import rebalance
from fedswarm.server.swarm.placement import Announced, Move
from fedswarm.server.swarm.rebalance import Rebalancer, RegistriesUnreachable, SpanMover, SwarmKey, initial_span
from tests.swarm_support import roundoff_tol, served

KEY = SwarmKey("tiny", "", 4)


@pytest.fixture()
def logged():
    """Messages of the rebalance logger (caplog misses them once the CLI's logging made "fedswarm" not propagate)."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("fedswarm.swarm.rebalance")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture()
def cli():
    """``fedswarm`` in this process, its logging set-up undone afterwards (its handler writes to capsys' stream)."""
    from fedswarm.common.cli import main

    logger = logging.getLogger("fedswarm")
    saved = list(logger.handlers), logger.propagate, logger.level
    yield main
    logger.handlers[:] = saved[0]
    logger.propagate = saved[1]
    logger.setLevel(saved[2])


def info(address: str, start: int, end: int, model: str = "tiny", adapter: str = "", blocks: int = 4):
    return swarm_pb2.ServerInfo(
        address=address, model_id=model, adapter_id=adapter, num_blocks=blocks, start=start, end=end, throughput=10.0
    )


def test_only_servers_of_the_same_model_adapter_and_size_are_peers():
    listed = [info("a:1", 0, 2), info("b:1", 2, 4, model="other"), info("c:1", 2, 4, adapter="x"), info("d:1", 0, 1)]
    listed.append(info("e:1", 0, 2, blocks=8))
    assert KEY.peers(listed) == [Announced("a:1", 0, 2, 10.0), Announced("d:1", 0, 1, 10.0)]


def test_a_joining_server_waits_for_a_registry_then_takes_the_gap(monkeypatch, logged):
    answers = [RegistriesUnreachable("registry unreachable: r:1 (UNAVAILABLE)")] * 2 + [[info("a:1", 0, 2)]]
    slept = []
    monkeypatch.setattr(rebalance.time, "sleep", slept.append)

    def lister():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert initial_span(lister, KEY, 2, wait_s=30) == (2, 4)
    assert slept == [1.0, 2.0]  # backoff
    assert logged[0] == "--blocks auto: registry unreachable: r:1 (UNAVAILABLE); retrying in 1 s"


def test_a_joining_server_with_an_unreachable_registry_fails_in_one_line(monkeypatch, capsys, cli):
    monkeypatch.setattr(rebalance, "START_WAIT_S", 0.3)
    argv = ["swarm", "serve", "--registry", "127.0.0.1:1", "--model", "tiny", "--blocks", "auto", "--insecure"]
    assert cli(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fedswarm swarm: error: --blocks auto: no registry answered within 0.3 s (registry unreachable: "
        "127.0.0.1:1 (UNAVAILABLE)); start one or fix --registry"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--blocks", "0:2", "--num-blocks", "2"], "--num-blocks applies to --blocks auto only"),
        (["--blocks", "auto", "--num-blocks", "-1"], "--num-blocks -1: must be >= 0"),
        (["--blocks", "auto", "--rebalance-gain", "0.9"], "--rebalance-gain 0.9: must be >= 1"),
    ],
)
def test_auto_options_are_checked_before_anything_loads(capsys, cli, extra, message):
    assert cli(["swarm", "serve", "--registry", "127.0.0.1:1", "--model", "tiny", "--insecure", *extra]) == 2
    assert message in capsys.readouterr().err


class FakeSwarm:
    """A registry listing to check against, and a record of the moves made."""

    def __init__(self, me: swarm_pb2.ServerInfo, listed: list[swarm_pb2.ServerInfo]) -> None:
        self.me, self.listed, self.moves = me, listed, []

    def rebalancer(self) -> Rebalancer:
        return Rebalancer(KEY, lambda: self.listed, lambda: self.me, lambda s, e: self.moves.append((s, e)), 1.5)


def test_the_first_ranked_server_moves_at_its_first_check():
    me = info("a:1", 0, 2)
    swarm = FakeSwarm(me, [me, info("c:1", 0, 2)])  # the server on 2:4 was killed
    assert swarm.rebalancer().check() == Move(2, 4, 0)
    assert swarm.moves == [(2, 4)]


def test_a_later_ranked_server_waits_its_turn_and_stands_down_once_the_gap_is_closed():
    me = info("c:1", 0, 2)
    swarm = FakeSwarm(me, [info("a:1", 0, 2), me])
    rebalancer = swarm.rebalancer()
    assert rebalancer.check() is None  # a:1 is asked first
    swarm.listed = [info("a:1", 2, 4), me]  # ... and moved
    assert rebalancer.check() is None and rebalancer.check() is None
    assert swarm.moves == []


def test_a_later_ranked_server_moves_when_the_first_one_does_not():
    me = info("c:1", 0, 2)
    swarm = FakeSwarm(me, [info("a:1", 0, 2), me])  # a:1 may have fixed blocks: it never moves
    rebalancer = swarm.rebalancer()
    assert rebalancer.check() is None
    assert rebalancer.check() == Move(2, 4, 1)
    assert swarm.moves == [(2, 4)]


def test_a_check_without_a_registry_is_skipped(logged):
    def down():
        raise RegistriesUnreachable("registry unreachable: r:1 (UNAVAILABLE)")

    moves = []
    rebalancer = Rebalancer(KEY, down, lambda: info("a:1", 0, 2), lambda s, e: moves.append((s, e)), 1.5)
    assert rebalancer.check() is None
    assert moves == [] and logged == ["rebalance check skipped: registry unreachable: r:1 (UNAVAILABLE)"]


def _open(start: int, end: int, hidden: torch.Tensor) -> swarm_pb2.InferenceRequest:
    return swarm_pb2.InferenceRequest(
        protocol_version=PROTOCOL_VERSION, start=start, end=end, max_length=16, hidden=to_proto(hidden)
    )


def _forward(stub, start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
    request = swarm_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, start=start, end=end, hidden=to_proto(hidden))
    return from_proto(stub.Forward(request).hidden)


def test_a_move_keeps_live_sessions_on_the_old_span_and_sends_new_ones_to_the_new_span():
    from fedswarm.server.swarm.blocks import load_span
    from fedswarm.server.swarm.handler import BlockServicer
    from fedswarm.server.swarm.scheduler import BatchScheduler
    from fedswarm.server.swarm.served import ServedSpan
    from fedswarm.server.swarm.sessions import SessionTable

    spec = parse_model("tiny")
    old_span, new_span = load_span(spec, 0, 2), load_span(spec, 2, 4)
    servicer = BlockServicer(old_span, info("x:1", 0, 2), SessionTable(2**26, 60.0), max_length=16)
    published = []

    def publish(edit):
        fresh = swarm_pb2.ServerInfo()
        fresh.CopyFrom(servicer.info)
        edit(fresh)
        servicer.info = fresh
        published.append((fresh.start, fresh.end))

    build = lambda s, e: ServedSpan(new_span, BatchScheduler(new_span).start())  # noqa: E731
    mover = SpanMover(servicer, build, publish, drain_s=30.0)
    stack = contextlib.ExitStack()
    requests: queue.Queue = queue.Queue()
    try:
        stub = stack.enter_context(served(servicer))
        x = torch.randn(1, 4, 64)
        stream = stub.Inference(iter(requests.get, None))
        requests.put(_open(0, 2, x[:, :3]))
        outputs = [from_proto(next(stream).hidden)]
        old = servicer.served

        mover(2, 4)
        assert published == [(2, 4)] and (servicer.info.start, servicer.info.end) == (2, 4)
        requests.put(swarm_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, hidden=to_proto(x[:, 3:])))
        outputs.append(from_proto(next(stream).hidden))  # the open session goes on, on blocks 0:2
        with torch.no_grad():
            expected = old_span.forward(x, 0, 2)
        assert (torch.cat(outputs, dim=1) - expected).abs().max() <= roundoff_tol(expected)
        with pytest.raises(grpc.RpcError) as refused:
            _forward(stub, 0, 2, x)  # new requests get the new span
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with torch.no_grad():
            expected = new_span.forward(x, 2, 4)
            assert (_forward(stub, 2, 4, x) - expected).abs().max() <= roundoff_tol(expected)
        assert old.users == 1 and not old.stopped.is_set()  # still draining

        requests.put(None)  # the client ends its session ...
        assert list(stream) == []
        assert old.stopped.wait(10.0)  # ... and the old span is retired at once
    finally:
        requests.put(None)
        stack.close()
        servicer.scheduler.stop()
