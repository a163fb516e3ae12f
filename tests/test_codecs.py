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
from fedswarm.common.flower_internals import act_as_node
from fedswarm.server.coordinator.round_plan import NodeBook
from fedswarm.server.coordinator.strategy import RESIDUAL, LoraStrategy

pytestmark = pytest.mark.usefixtures("flower_task")  # replies are stamped as a node's

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "server", "client", "simulation", "protos")


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


A1, B1 = _t([[1, 0, 0], [0, 1, 0]]), _t([[1, 0], [0, 1]])
A2, B2 = _t([[0, 0, 1], [1, 1, 1]]), _t([[2, 2], [0, 4]])


def _reply(state: dict, examples: int, node: int, rank: int = 2) -> Message:
    act_as_node(node)  # a reply's source is the node that built it
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "lora-rank": rank}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def _aggregate_train(codec, replies, prior, server_lr=1.0):
    """A round's aggregation through the coordinator's strategy, started from ``prior`` (as its configure_train
    leaves it): the aggregate's tensors and the train metrics."""
    strategy = LoraStrategy(codec, NodeBook(), clients=2, min_clients=2, node_wait=1.0, server_lr=server_lr)
    strategy.prior = prior
    arrays, metrics = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict(), metrics


def test_fedavg_sends_everything_and_averages_both_factors():
    codec = codec_for(FederationConfig(aggregation="fedavg", lora_rank=2))
    state = {A: A1, B: B1}
    assert codec.outgoing(state).keys() == {A, B} and codec.personal(state, 2) is None
    rebuilt = codec.rebuild({A: A2, B: B2}, state, rank=2)
    assert torch.equal(rebuilt[A], A1) and torch.equal(rebuilt[B], B1)
    assert codec.trainable(A) and codec.trainable(B) and codec.reply(state).keys() == {A, B}
    replies = [_reply({A: A1, B: B1}, 1, 1), _reply({A: A2, B: B2}, 3, 2)]
    prior = {A: torch.zeros(2, 3), B: torch.zeros(2, 2)}
    mean, metrics = _aggregate_train(codec, replies, prior)
    assert torch.equal(mean[A], _t([[0.25, 0, 0.75], [0.75, 1, 0.75]]))  # (A1 + 3 A2) / 4
    assert torch.equal(mean[B], _t([[1.75, 1.5], [0, 3.25]]))  # (B1 + 3 B2) / 4
    stepped = codec.complete(mean, prior, 2.0)  # FedOpt's server step: prior + 2 (mean - prior)
    assert torch.equal(stepped[A], 2 * mean[A]) and torch.equal(stepped[B], 2 * mean[B])
    # averaging apart is not the mean product: the residual says so. By hand (one rank: s cancels), the mean
    # product (B1 A1 + 3 B2 A2) / 4 = (A1 + 3 [[2, 2, 4], [4, 4, 4]]) / 4, against the product of the means
    target = torch.tensor([[1.75, 1.5, 3.0], [3.0, 3.25, 3.0]], dtype=torch.float64)
    product = mean[B].double() @ mean[A].double()
    expected = float((target - product).norm() / target.norm())
    assert metrics[RESIDUAL] == pytest.approx(expected, rel=1e-12) and expected > 0.1


def test_ffa_sends_only_b_keeps_the_seeded_a_and_is_exact():
    codec = codec_for(FederationConfig(aggregation="ffa", lora_rank=2))
    state = {A: A1, B: B1}
    assert codec.outgoing(state).keys() == {B}
    rebuilt = codec.rebuild({A: A1, B: _t([[9, 9], [9, 9]])}, {B: B2}, rank=2)  # the node's own A, received B
    assert torch.equal(rebuilt[A], A1) and torch.equal(rebuilt[B], B2)
    assert not codec.trainable("base.m.q.lora_A.default.weight") and codec.trainable(B)
    assert codec.reply(state).keys() == {B}
    replies = [_reply({B: B1}, 1, 1), _reply({B: B2}, 3, 2)]
    mean, metrics = _aggregate_train(codec, replies, {A: A1, B: B1})
    assert mean.keys() == {B} and torch.equal(mean[B], _t([[1.75, 1.5], [0, 3.25]]))
    new = codec.complete(mean, {A: A1, B: B1})
    assert torch.equal(new[A], A1) and torch.equal(new[B], mean[B])  # the fixed A comes back
    assert metrics[RESIDUAL] < 1e-12  # a shared A makes the mean of B exact


def _svd_codec(global_rank: int) -> object:
    return codec_for(FederationConfig(aggregation="svd", lora_rank=1, global_rank=global_rank, lora_alpha=2.0))


def test_svd_aggregates_products_exactly_and_truncates_by_singular_value():
    # rank-1 clients, s = alpha / 1 = 2: 2 * B1 A1 = [[2,0,0],[0,0,0]], 2 * B2 A2 = [[0,0,0],[0,6,0]]
    c1 = {A: _t([[1, 0, 0]]), B: _t([[1], [0]])}
    c2 = {A: _t([[0, 1, 0]]), B: _t([[0], [3]])}
    replies = [_reply(c1, 1, 1, rank=1), _reply(c2, 1, 2, rank=1)]
    target = torch.tensor([[1.0, 0, 0], [0, 3, 0]], dtype=torch.float64)  # the equal-weight mean product
    full = _svd_codec(2)
    aggregate, metrics = _aggregate_train(full, replies, {})
    state = full.complete(aggregate, {})
    assert state[A].shape == (2, 3) and state[B].shape == (2, 2)
    torch.testing.assert_close((2.0 / 2) * state[B].double() @ state[A].double(), target, rtol=0, atol=1e-6)
    assert metrics[RESIDUAL] < 1e-7  # global rank 2 >= sum of client ranks
    # the node of rank 1 receives the leading component (singular value 3) at its own scale, same product
    mine = full.personal(state, 1)
    leading = torch.tensor([[0.0, 0, 0], [0, 3, 0]], dtype=torch.float64)
    torch.testing.assert_close(2.0 * mine[B].double() @ mine[A].double(), leading, rtol=0, atol=1e-6)
    assert full.expected_shapes(state, 1) == {A: (1, 3), B: (2, 1)}  # replies come at the reported rank
    assert full.expected_shapes(state, True) == {A: (2, 3), B: (2, 2)}  # not a rank: the shapes sent
    # truncated at rank 1: the singular value 1 is dropped, residual sqrt(1 / (1 + 9))
    one = _svd_codec(1)
    aggregate, metrics = _aggregate_train(one, replies, {})
    assert metrics[RESIDUAL] == pytest.approx(math.sqrt(0.1))
    # the codec's general residual (complete, then compare products) agrees with the SVD's own
    clients = one.clients(replies, {})
    assert one.residual(clients, aggregate, {}) == pytest.approx(math.sqrt(0.1))


def test_svd_node_rebuild_pads_with_its_own_a():
    codec = _svd_codec(1)
    current = {A: _t([[5, 5, 5], [7, 7, 7]]), B: torch.zeros(2, 2)}  # the node trains at rank 2
    received = {A: _t([[1, 0, 0]]), B: _t([[1], [0]])}  # the global adapter at rank 1, scale 2
    rebuilt = codec.rebuild(current, received, rank=2)
    assert torch.equal(rebuilt[A][1], current[A][1])  # new row from the node's own A
    assert torch.equal(rebuilt[B][:, 1], torch.zeros(2))  # whose B column is zero: the product is kept
    product = (2.0 / 2) * rebuilt[B].double() @ rebuilt[A].double()
    torch.testing.assert_close(product, 2.0 * received[B].double() @ received[A].double())


def test_codecs_hold_no_state_across_calls():
    """Two rounds' calls interleaved (round 2 decoded and aggregated between round 1's decode and its
    aggregate) give each round's hand-computed aggregate and residual: nothing is carried between calls."""
    codec = _svd_codec(2)
    round1 = [_reply({A: _t([[1, 0, 0]]), B: _t([[1], [0]])}, 1, 1, rank=1),
              _reply({A: _t([[0, 1, 0]]), B: _t([[0], [3]])}, 1, 2, rank=1)]  # fmt: skip
    round2 = [_reply({A: _t([[0, 0, 1]]), B: _t([[2], [0]])}, 1, 1, rank=1),
              _reply({A: _t([[0, 0, 1]]), B: _t([[0], [2]])}, 3, 2, rank=1)]  # fmt: skip
    first = codec.clients(round1, {})
    second = codec.clients(round2, {})  # round 2's replies decoded before round 1 aggregates
    two = codec.aggregate(second, {})
    one = codec.aggregate(first, {})
    # s = 2: round 1's mean product diag(1, 3) (rank 2, exact); round 2's [[0,0,1],[0,0,3]] (rank 1, exact)
    torch.testing.assert_close(
        one.state[B].double() @ one.state[A].double(),
        torch.tensor([[1.0, 0, 0], [0, 3, 0]], dtype=torch.float64), rtol=0, atol=1e-6,
    )  # fmt: skip
    torch.testing.assert_close(
        two.state[B].double() @ two.state[A].double(),
        torch.tensor([[0.0, 0, 1], [0, 0, 3]], dtype=torch.float64), rtol=0, atol=1e-6,
    )  # fmt: skip
    assert one.residual < 1e-7 and two.residual < 1e-7
    # the same for fedavg, round 2 aggregated first, then round 1: (A1 + 3 A2) / 4 and A1 alone
    fedavg = codec_for(FederationConfig(aggregation="fedavg", lora_rank=2))
    r1 = fedavg.clients([_reply({A: A1, B: B1}, 1, 1), _reply({A: A2, B: B2}, 3, 2)], {})
    r2 = fedavg.clients([_reply({A: A1, B: B1}, 5, 1)], {})
    alone = fedavg.aggregate(r2, {})
    mixed = fedavg.aggregate(r1, {})
    assert torch.equal(alone.state[A], A1) and alone.residual == 0.0
    assert torch.equal(mixed.state[A], _t([[0.25, 0, 0.75], [0.75, 1, 0.75]]))
    assert not hasattr(codec, "__dict__") or set(vars(codec)) == {"alpha", "rank"}  # the run's constants only


def test_aggregation_decodes_each_reply_once(monkeypatch):
    calls = []
    original = ArrayRecord.to_torch_state_dict

    def counting(self, *args, **kwargs):
        calls.append(id(self))
        return original(self, *args, **kwargs)

    codec = codec_for(FederationConfig(aggregation="ffa", lora_rank=2))
    replies = [_reply({B: B1}, 1, 1), _reply({B: B2}, 3, 2)]
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", counting)
    _, metrics = _aggregate_train(codec, replies, {A: A1, B: B1})
    ids = [id(r.content["arrays"]) for r in replies]
    assert sorted(c for c in calls if c in ids) == sorted(ids)  # aggregate and residual share one decode
    assert RESIDUAL in metrics


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
