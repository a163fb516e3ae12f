"""Each aggregation mode's codec against values computed by hand, and the rule that only codecs know the modes.

One LoRA layer ``m.q`` (in 3, out 2). Small integers and quarters are exact in float32, so
sends, rebuilds and fedavg/ffa means are compared exactly; products and SVDs in float64.
"""

import ast
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedswarm.common.codecs import MODES, codec_for
from fedswarm.common.config import FederationConfig
from fedswarm.server.coordinator.replies import screen_replies

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "server", "client", "simulation", "protos")


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the running task's identity, as its engine sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


A1, B1 = _t([[1, 0, 0], [0, 1, 0]]), _t([[1, 0], [0, 1]])
A2, B2 = _t([[0, 0, 1], [1, 1, 1]]), _t([[2, 2], [0, 4]])


def _reply(state: dict, examples: int, node: int, rank: int = 2) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = node  # a reply's source is the node that built it
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "lora-rank": rank}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def test_fedavg_sends_everything_and_averages_both_factors():
    codec = codec_for(FederationConfig(aggregation="fedavg", lora_rank=2, server_lr=2.0))
    state = {A: A1, B: B1}
    assert codec.outgoing(state).keys() == {A, B} and codec.personal(state, 2) is None
    rebuilt = codec.rebuild({A: A2, B: B2}, state, rank=2)
    assert torch.equal(rebuilt[A], A1) and torch.equal(rebuilt[B], B1)
    assert codec.trainable(A) and codec.trainable(B) and codec.reply(state).keys() == {A, B}
    replies = [_reply({A: A1, B: B1}, 1, 1), _reply({A: A2, B: B2}, 3, 2)]
    arrays, metrics = codec.strategy(2).aggregate_train(1, replies)
    mean = arrays.to_torch_state_dict()
    assert torch.equal(mean[A], _t([[0.25, 0, 0.75], [0.75, 1, 0.75]]))  # (A1 + 3 A2) / 4
    assert torch.equal(mean[B], _t([[1.75, 1.5], [0, 3.25]]))  # (B1 + 3 B2) / 4
    prior = {A: torch.zeros(2, 3), B: torch.zeros(2, 2)}
    stepped = codec.complete(mean, prior)  # FedOpt's server step: prior + 2 (mean - prior)
    assert torch.equal(stepped[A], 2 * mean[A]) and torch.equal(stepped[B], 2 * mean[B])
    # averaging apart is not the mean product: the residual says so (hand: ||mean p s BA - s B'A'|| / ||...||)
    assert codec.residual(None, replies, mean, prior) > 0.1


def test_ffa_sends_only_b_keeps_the_seeded_a_and_is_exact():
    codec = codec_for(FederationConfig(aggregation="ffa", lora_rank=2))
    state = {A: A1, B: B1}
    assert codec.outgoing(state).keys() == {B}
    rebuilt = codec.rebuild({A: A1, B: _t([[9, 9], [9, 9]])}, {B: B2}, rank=2)  # the node's own A, received B
    assert torch.equal(rebuilt[A], A1) and torch.equal(rebuilt[B], B2)
    assert not codec.trainable("base.m.q.lora_A.default.weight") and codec.trainable(B)
    assert codec.reply(state).keys() == {B}
    replies = [_reply({B: B1}, 1, 1), _reply({B: B2}, 3, 2)]
    arrays, _ = codec.strategy(2).aggregate_train(1, replies)
    mean = arrays.to_torch_state_dict()
    assert mean.keys() == {B} and torch.equal(mean[B], _t([[1.75, 1.5], [0, 3.25]]))
    new = codec.complete(mean, {A: A1, B: B1})
    assert torch.equal(new[A], A1) and torch.equal(new[B], mean[B])  # the fixed A comes back
    assert codec.residual(None, replies, new, {A: A1, B: B1}) < 1e-12  # a shared A makes the mean of B exact


def _svd_codec(global_rank: int) -> object:
    return codec_for(FederationConfig(aggregation="svd", lora_rank=1, global_rank=global_rank, lora_alpha=2.0))


def test_svd_aggregates_products_exactly_and_truncates_by_singular_value():
    # rank-1 clients, s = alpha / 1 = 2: 2 * B1 A1 = [[2,0,0],[0,0,0]], 2 * B2 A2 = [[0,0,0],[0,6,0]]
    c1 = {A: _t([[1, 0, 0]]), B: _t([[1], [0]])}
    c2 = {A: _t([[0, 1, 0]]), B: _t([[0], [3]])}
    replies = [_reply(c1, 1, 1, rank=1), _reply(c2, 1, 2, rank=1)]
    target = torch.tensor([[1.0, 0, 0], [0, 3, 0]], dtype=torch.float64)  # the equal-weight mean product
    full = _svd_codec(2)
    strategy = full.strategy(2)
    arrays, _ = strategy.aggregate_train(1, replies)
    state = full.complete(arrays.to_torch_state_dict(), {})
    assert state[A].shape == (2, 3) and state[B].shape == (2, 2)
    torch.testing.assert_close((2.0 / 2) * state[B].double() @ state[A].double(), target, rtol=0, atol=1e-6)
    assert full.residual(strategy, replies, state, {}) < 1e-7  # global rank 2 >= sum of client ranks
    # the node of rank 1 receives the leading component (singular value 3) at its own scale, same product
    mine = full.personal(state, 1)
    leading = torch.tensor([[0.0, 0, 0], [0, 3, 0]], dtype=torch.float64)
    torch.testing.assert_close(2.0 * mine[B].double() @ mine[A].double(), leading, rtol=0, atol=1e-6)
    assert full.expected_shapes(state, 1) == {A: (1, 3), B: (2, 1)}  # replies come at the reported rank
    assert full.expected_shapes(state, True) == {A: (2, 3), B: (2, 2)}  # not a rank: the shapes sent
    # truncated at rank 1: the singular value 1 is dropped, residual sqrt(1 / (1 + 9))
    one = _svd_codec(1)
    strategy = one.strategy(2)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert one.residual(strategy, replies, arrays.to_torch_state_dict(), {}) == pytest.approx(math.sqrt(0.1))


def test_svd_node_rebuild_pads_with_its_own_a():
    codec = _svd_codec(1)
    current = {A: _t([[5, 5, 5], [7, 7, 7]]), B: torch.zeros(2, 2)}  # the node trains at rank 2
    received = {A: _t([[1, 0, 0]]), B: _t([[1], [0]])}  # the global adapter at rank 1, scale 2
    rebuilt = codec.rebuild(current, received, rank=2)
    assert torch.equal(rebuilt[A][1], current[A][1])  # new row from the node's own A
    assert torch.equal(rebuilt[B][:, 1], torch.zeros(2))  # whose B column is zero: the product is kept
    product = (2.0 / 2) * rebuilt[B].double() @ rebuilt[A].double()
    torch.testing.assert_close(product, 2.0 * received[B].double() @ received[A].double())


def test_each_reply_is_decoded_once(monkeypatch):
    calls = []
    original = ArrayRecord.to_torch_state_dict

    def counting(self, *args, **kwargs):
        calls.append(id(self))
        return original(self, *args, **kwargs)

    cfg = FederationConfig(aggregation="ffa", lora_rank=2)
    codec = codec_for(cfg)
    replies = [_reply({B: B1}, 1, 1), _reply({B: B2}, 3, 2)]
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", counting)
    screened = screen_replies(replies, cfg, {1: {B: B1}, 2: {B: B1}}, 1, codec)
    assert len(screened.accepted) == 2
    arrays, _ = codec.strategy(2).aggregate_train(1, screened.accepted)
    codec.residual(None, screened.accepted, {A: A1, **arrays.to_torch_state_dict()}, {A: A1, B: B1})
    ids = [id(r.content["arrays"]) for r in replies]
    assert sorted(c for c in calls if c in ids) == sorted(ids)  # screening, aggregation, residual: once each
    codec.forget()
    assert codec.decode(replies[0]) is not None and calls.count(ids[0]) == 2  # a new round decodes again


def _mode_comparisons(source: str) -> list[int]:
    """Lines comparing anything with a mode's name, or comparing an ``aggregation`` attribute or name."""

    def names_a_mode(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in MODES
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return any(names_a_mode(e) for e in node.elts)
        return (isinstance(node, ast.Attribute) and node.attr == "aggregation") or (
            isinstance(node, ast.Name) and node.id == "aggregation"
        )

    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Compare) and any(names_a_mode(x) for x in [node.left, *node.comparators])
    ]


def test_no_module_outside_the_codecs_compares_the_aggregation_mode():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in PACKAGES
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "codecs" not in path.parts
        for line in _mode_comparisons(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_mode_check_sees_the_comparisons_it_forbids():
    source = 'if cfg.aggregation == "ffa": pass\nif mode in ("svd", "x"): pass\nif aggregation != m: pass\nx = "ffa"\n'
    assert _mode_comparisons(source) == [1, 2, 3]
