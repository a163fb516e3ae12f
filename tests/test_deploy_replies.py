"""Screening of training replies: malformed updates are rejected before aggregation."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedswarm.common.config import FederationConfig
from fedswarm.common.flower_internals import act_as_node
from fedswarm.server.coordinator.replies import screen_replies, update_norm
from fedswarm.server.coordinator.rounds import content_bytes

pytestmark = pytest.mark.usefixtures("flower_task")  # replies are stamped as a node's

A, B = "layer.lora_A.weight", "layer.lora_B.weight"


def _sent(rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {A: torch.randn(rank, 16, generator=gen), B: torch.zeros(16, rank)}


def _reply(node: int, arrays: dict | None, examples=10, **metrics) -> Message:
    act_as_node(node)  # a reply's source is the node that built it
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, **metrics})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, dst_node_id=0, message_type="train")


def _screen(replies, cfg=None, rank=4):
    cfg = cfg or FederationConfig(clients=3)
    sent = {int(r.metadata.src_node_id): _sent(rank) for r in replies}
    return screen_replies(replies, cfg, sent, round_no=1)


def test_good_replies_pass_in_node_order():
    good = {A: _sent()[A], B: torch.full((16, 4), 0.01)}
    out = _screen([_reply(9, good), _reply(3, good), _reply(5, good)])
    assert [r.metadata.src_node_id for r in out.accepted] == [3, 5, 9]
    assert out.rejected == []


@pytest.mark.parametrize(
    ("arrays", "why"),
    [
        ({A: torch.zeros(4, 16)}, "keys differ"),  # B missing
        ({**_sent(), "layer.extra.weight": torch.zeros(2)}, "keys differ"),
        ({A: torch.zeros(4, 16), B: torch.zeros(16, 8)}, "shape"),
        ({A: torch.zeros(4, 16), B: torch.full((16, 4), math.nan)}, "NaN or Inf"),
        ({A: torch.zeros(4, 16), B: torch.full((16, 4), math.inf)}, "NaN or Inf"),
        ({A: torch.zeros(4, 16, dtype=torch.int64), B: torch.zeros(16, 4)}, "dtype"),
        (None, "no adapter"),
    ],
)
def test_malformed_updates_are_rejected(arrays, why):
    out = _screen([_reply(7, arrays), _reply(8, _sent())])
    assert [r.metadata.src_node_id for r in out.accepted] == [8]
    assert len(out.rejected) == 1 and out.rejected[0].startswith("node 7:") and why in out.rejected[0]


def test_bad_weights_are_rejected():
    for weight in (0, -3, math.nan, math.inf):
        out = _screen([_reply(2, _sent(), examples=weight)])
        assert out.accepted == [] and "num-examples" in out.rejected[0], weight


def test_update_norm_limit():
    sent = _sent()
    far = {A: sent[A], B: torch.full((16, 4), 1.0)}  # ||delta|| = sqrt(64) = 8
    assert update_norm(far, sent) == pytest.approx(8.0)
    near = {A: sent[A], B: torch.full((16, 4), 0.1)}  # 0.8
    out = _screen([_reply(1, far), _reply(2, near)], FederationConfig(clients=3, max_update_norm=2.0))
    assert [r.metadata.src_node_id for r in out.accepted] == [2]
    assert "update norm 8 exceeds --max-update-norm 2" in out.rejected[0]
    unlimited = _screen([_reply(1, far)])
    assert len(unlimited.accepted) == 1


def test_declined_replies_pass_without_arrays():
    out = _screen([_reply(4, None, declined=1)])
    assert len(out.accepted) == 1


def test_svd_accepts_the_nodes_own_rank_only():
    cfg = FederationConfig(clients=3, aggregation="svd", client_ranks="2,8")
    own = {A: torch.zeros(2, 16), B: torch.zeros(16, 2)}
    ok = _screen([_reply(1, own, **{"lora-rank": 2})], cfg, rank=8)
    assert len(ok.accepted) == 1
    lying = _screen([_reply(1, own, **{"lora-rank": 4})], cfg, rank=8)
    assert lying.accepted == [] and "shape" in lying.rejected[0]


def test_content_bytes_counts_empty_strings():
    # Flower 1.42's ConfigRecord.count_bytes raises on "" (e.g. client-ranks="")
    msg = Message(
        content=RecordDict({"config": ConfigRecord({"a": "", "bc": "xyz", "d": 3, "e": True})}),
        dst_node_id=1,
        message_type="train",
    )
    assert content_bytes(msg) == (1 + 0) + (2 + 3) + (1 + 8) + (1 + 1)
