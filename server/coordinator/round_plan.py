"""Per-node train messages, and what the coordinator learns from the replies.

The coordinator keeps, per node: its LoRA rank (svd sends each client its own rank) and
its DP accountant history (saved in checkpoints, sent back to a node that lost its
state). Replies that declined (DP budget) carry no arrays and are set apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedswarm.common.codecs import AdapterCodec
from fedswarm.common.codecs.product import State
from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import PRIVACY_KEY, Reply, Sent, flag, is_packed, number, to_record, whole


@dataclass
class NodeBook:
    """What the coordinator remembers about nodes between rounds (checkpointed)."""

    ranks: dict[int, int] = field(default_factory=dict)
    privacy: dict[int, str] = field(default_factory=dict)  # node -> accountant history JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "ranks": {str(k): v for k, v in self.ranks.items()},
            "privacy": {str(k): v for k, v in self.privacy.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeBook:
        return cls(
            {int(k): int(v) for k, v in data.get("ranks", {}).items()},
            {int(k): str(v) for k, v in data.get("privacy", {}).items()},
        )


def round_config(cfg: FederationConfig, round_no: int, simulated: bool = False) -> ConfigRecord:
    """The settings every node is sent this round: the node-side ones and the round number.

    In a simulation the virtual nodes partition the run's data on the coordinator's own
    machine, so they are sent its path (``pool``); a deployed node never is.
    """
    pool = {Sent.POOL: cfg.data} if simulated else {}
    return ConfigRecord({**cfg.node_run_config(), Sent.SERVER_ROUND: round_no, **pool})


def personalise(messages: Iterable[Message], codec: AdapterCodec, prior: State, book: NodeBook) -> list[Message]:
    """Each strategy-built message with its node's DP history, and its own adapter where the codec says so
    (``prior``: the global adapter the round starts from)."""
    out = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        config = ConfigRecord(dict(msg.content.config_records["config"]))
        if node in book.privacy:
            config[Sent.DP_HISTORY] = book.privacy[node]
        own = codec.personal(prior, book.ranks.get(node))
        sent = msg.content.array_records["arrays"]
        arrays = sent if own is None else to_record(own, packed=is_packed(sent))
        content = RecordDict({"arrays": arrays, "config": config})
        out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
    return out


def learn_from(replies: list[Message], book: NodeBook) -> tuple[list[Message], list[Message]]:
    """Record ranks and DP histories; split replies into (trained, declined)."""
    trained: list[Message] = []
    declined: list[Message] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        metrics = reply.content["metrics"]
        if Reply.LORA_RANK in metrics:
            book.ranks[node] = whole(metrics, Reply.LORA_RANK)
        if PRIVACY_KEY in reply.content:
            book.privacy[node] = str(reply.content[PRIVACY_KEY]["history"])
        (declined if flag(metrics, Reply.DECLINED) else trained).append(reply)
    return trained, declined


def privacy_row(replies: list[Message], declined: list[Message]) -> dict[str, Any]:
    """Per-round local-DP figures: epsilon max/mean over the nodes that reported one."""
    eps = [
        number(r.content["metrics"], Reply.EPSILON) for r in replies + declined if Reply.EPSILON in r.content["metrics"]
    ]
    if not eps:
        return {}
    first = (replies + declined)[0].content["metrics"]
    return {
        "epsilon_max": max(eps),
        "epsilon_mean": sum(eps) / len(eps),
        "delta": number(first, Reply.DELTA),
        "noise_multiplier": number(first, Reply.NOISE_MULTIPLIER),
        "max_grad_norm": number(first, Reply.MAX_GRAD_NORM),
        "declined": len(declined),
        "declined_notes": [str(r.content[PRIVACY_KEY]["note"]) for r in declined if PRIVACY_KEY in r.content],
    }
