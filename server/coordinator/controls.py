"""SCAFFOLD on the coordinator: the federation's control variate ``c`` from the nodes' ``c_i``.

Each reply of a ``--scaffold`` round carries the node's new ``c_i`` (its mean local
gradient, ``client/trainer/drift.py``); ``c`` is their mean weighted like the adapters
(``num-examples``), and goes out with the next round's adapter. With every node training
each round this is SCAFFOLD's ``c``; with dropouts it is the mean over the nodes heard
from this round. ``c`` is checkpointed beside the adapter, so a resumed run goes on with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from flwr.app import Message

from fedswarm.common.contract import CONTROL_KEY, Reply, arrays_of, number, to_record

if TYPE_CHECKING:
    import torch


def pop_mean_control(replies: Sequence[Message]) -> dict[str, torch.Tensor]:
    """``sum_i n_i c_i / sum_i n_i`` over the replies (screened: every one has a well-formed c_i).

    The control records leave the replies, so the strategy sees one ArrayRecord per reply
    (the adapter), as Flower's FedAvg requires.
    """
    weights = [number(r.content["metrics"], Reply.NUM_EXAMPLES) for r in replies]
    total = sum(weights)
    out: dict[str, torch.Tensor] = {}
    for weight, reply in zip(weights, replies, strict=True):
        for key, tensor in arrays_of(reply.content, CONTROL_KEY).items():
            term = tensor.double() * (weight / total)
            out[key] = out[key] + term if key in out else term
        del reply.content[CONTROL_KEY]
    return {k: v.float() for k, v in out.items()}


def attach_control(messages: Sequence[Message], control: dict[str, torch.Tensor] | None) -> None:
    """Send ``c`` with each training message (nothing in round 1, when there is no ``c`` yet)."""
    if control is None:
        return
    for message in messages:
        message.content[CONTROL_KEY] = to_record(control)
