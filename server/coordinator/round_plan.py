"""Per-node train messages, and what the coordinator learns from the replies.

The coordinator keeps, per node: its LoRA rank (svd sends each client its own rank) and
its DP accountant history (saved in checkpoints, sent back to a node that lost its
state). Replies that declined (DP budget) carry no arrays and are set apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import PRIVACY_KEY, Reply, Sent
from fedswarm.server.coordinator.aggregation import Client, residual, server_step
from fedswarm.server.coordinator.strategy import LoraSvd, client_of


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


def outgoing_state(cfg: FederationConfig, state: dict, rank: int | None) -> dict:
    """The global adapter as a node should receive it: B only under ffa, its own rank under svd."""
    from fedswarm.common.lora import resize_rank

    if cfg.aggregation == "ffa":
        return {k: v for k, v in state.items() if "lora_B" in k}
    if cfg.aggregation == "svd" and rank is not None and rank != cfg.server_rank():
        return resize_rank(state, rank, cfg.lora_alpha / cfg.server_rank(), cfg.lora_alpha / rank)
    return state


def personalise(messages: Iterable[Message], cfg: FederationConfig, state: dict, book: NodeBook) -> list[Message]:
    """Give each strategy-built message its node's adapter rank and DP history."""
    out = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        config = ConfigRecord(dict(msg.content["config"]))
        if node in book.privacy:
            config[Sent.DP_HISTORY] = book.privacy[node]
        if cfg.aggregation == "svd" and node in book.ranks:
            arrays = ArrayRecord(outgoing_state(cfg, state, book.ranks[node]))
        else:
            arrays = msg.content["arrays"]
        content = RecordDict({"arrays": arrays, "config": config})
        out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
    return out


def learn_from(replies: list[Message], book: NodeBook) -> tuple[list[Message], list[Message]]:
    """Record ranks and DP histories; split replies into (trained, declined)."""
    trained, declined = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        metrics = reply.content["metrics"]
        if Reply.LORA_RANK in metrics:
            book.ranks[node] = int(metrics[Reply.LORA_RANK])
        if PRIVACY_KEY in reply.content:
            book.privacy[node] = str(reply.content[PRIVACY_KEY]["history"])
        (declined if int(metrics.get(Reply.DECLINED, 0)) else trained).append(reply)
    return trained, declined


def privacy_row(replies: list[Message], declined: list[Message]) -> dict[str, Any]:
    """Per-round local-DP figures: epsilon max/mean over the nodes that reported one."""
    eps = [float(r.content["metrics"]["epsilon"]) for r in replies + declined if "epsilon" in r.content["metrics"]]
    if not eps:
        return {}
    first = (replies + declined)[0].content["metrics"]
    return {
        "epsilon_max": max(eps),
        "epsilon_mean": sum(eps) / len(eps),
        "delta": float(first["delta"]),
        "noise_multiplier": float(first[Reply.NOISE_MULTIPLIER]),
        "max_grad_norm": float(first[Reply.MAX_GRAD_NORM]),
        "declined": len(declined),
        "declined_notes": [str(r.content[PRIVACY_KEY]["note"]) for r in declined if PRIVACY_KEY in r.content],
    }


def aggregation_residual(
    cfg: FederationConfig, strategy: Any, replies: list[Message], new_state: dict, fixed_a: dict, prior: dict
) -> float:
    """Relative Frobenius error of the aggregated product against ``sum p s B A`` (stepped from ``prior``)."""
    if isinstance(strategy, LoraSvd):
        return strategy.last_residual
    clients: list[Client] = [
        client_of(r, cfg.lora_alpha, fixed_a if cfg.aggregation == "ffa" else None) for r in replies
    ]
    scale = cfg.lora_alpha / cfg.server_rank()
    return residual(server_step(clients, prior, scale, cfg.server_lr), new_state, scale)
