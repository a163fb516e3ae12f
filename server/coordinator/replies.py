"""Screening training replies before aggregation: malformed updates are rejected, never averaged.

A node may be buggy, out of date or hostile. A reply is rejected when its adapter has
other tensors than the ones the node was sent (missing, extra, or another shape), holds
NaN or Inf, lies farther than ``--max-update-norm`` (L2 over all tensors) from the adapter
it was sent, or when its weight (``num-examples``) is not a positive finite number. Under
``--scaffold`` its control variate must pass the same checks (bar the distance).
Replies that declined to train (DP budget) carry no adapter and pass through.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import Message

from fedswarm.common.codecs import AdapterCodec, codec_for
from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import CONTROL_KEY, Reply, flag, from_record

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedswarm")


@dataclass
class Screened:
    accepted: list[Message] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # "node N: why", one per rejected reply


def screen_replies(
    replies: list[Message],
    cfg: FederationConfig,
    sent: dict[int, dict[str, torch.Tensor]],
    round_no: int,
    codec: AdapterCodec | None = None,
) -> Screened:
    """Split ``replies`` into accepted ones and reasons for the rejected ones (logged at WARNING).

    ``sent`` maps each node to the adapter it was sent (what the codec sends it). Accepted
    replies come back ordered by node id, so aggregation sums in a fixed order; their
    adapters stay decoded in ``codec`` for the aggregation.
    """
    codec = codec or codec_for(cfg)
    out = Screened()
    for reply in sorted(replies, key=lambda r: int(r.metadata.src_node_id)):
        node = int(reply.metadata.src_node_id)
        problem = reply_problem(reply, cfg, codec, sent.get(node))
        if problem is None:
            out.accepted.append(reply)
        else:
            out.rejected.append(f"node {node}: {problem}")
            log.warning("round %d: rejected the reply of node %d: %s", round_no, node, problem)
    return out


def reply_problem(
    reply: Message, cfg: FederationConfig, codec: AdapterCodec, sent: dict[str, torch.Tensor] | None
) -> str | None:
    """Why this reply must not be aggregated, or None when it may be."""
    if "metrics" not in reply.content.metric_records:
        return "no metrics record"
    metrics = reply.content.metric_records["metrics"]
    weight = metrics.get(Reply.NUM_EXAMPLES)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        return f"num-examples must be a positive number, got {weight!r}"
    try:
        declined = flag(metrics, Reply.DECLINED)
    except TypeError as exc:
        return str(exc)
    if declined:
        return None
    if "arrays" not in reply.content.array_records:
        return "no adapter (arrays record)"
    if sent is None:
        return "no adapter was sent to this node this round"
    try:
        state = codec.decode(reply)
    except Exception as exc:  # noqa: BLE001 - a payload that does not decode is malformed, whatever the cause
        return f"adapter does not decode: {exc}"
    expected = codec.expected_shapes(sent, metrics.get(Reply.LORA_RANK))
    problem = tensor_problem(state, expected, sent, cfg.max_update_norm)
    if problem is None and cfg.scaffold:
        problem = control_problem(reply, expected)
    return problem


def control_problem(reply: Message, expected: dict[str, tuple[int, ...]]) -> str | None:
    """A ``--scaffold`` reply must carry its node's c_i: the trained tensors' keys and shapes, finite."""
    if CONTROL_KEY not in reply.content.array_records:
        return "no SCAFFOLD control variate (control record)"
    try:
        control = from_record(reply.content.array_records[CONTROL_KEY])
    except Exception as exc:  # noqa: BLE001 - a payload that does not decode is malformed, whatever the cause
        return f"control variate does not decode: {exc}"
    problem = tensor_problem(control, expected, {}, 0.0)
    return None if problem is None else "control variate: " + problem.replace("adapter keys", "keys")


def tensor_problem(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    sent: dict[str, torch.Tensor],
    max_norm: float,
) -> str | None:
    """Keys, shapes, finiteness and distance from ``sent`` of an adapter update."""
    import torch

    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        return f"adapter keys differ: {len(missing)} missing {missing[:1]}, {len(extra)} unexpected {extra[:1]}"
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            return f"{key} has shape {tuple(tensor.shape)}, expected {shape}"
        if not tensor.is_floating_point():
            return f"{key} has dtype {tensor.dtype}, expected a floating-point tensor"
        if not bool(torch.isfinite(tensor).all()):
            return f"{key} holds NaN or Inf"
    if max_norm > 0:
        norm = update_norm(state, sent)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds --max-update-norm {max_norm:g}"
    return None


def update_norm(state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``state - sent`` over all tensors (a node's update to the adapter it received).

    Where the node trained at another rank than it was sent (svd), the received tensors
    are compared with zeros, i.e. the whole adapter counts as update.
    """
    total = 0.0
    for key, tensor in state.items():
        before = sent.get(key)
        delta = tensor.double() - before.double() if before is not None and before.shape == tensor.shape else tensor
        total += float(delta.double().pow(2).sum())
    return math.sqrt(total)
