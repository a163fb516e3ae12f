"""fedavg: both LoRA factors travel, train and are averaged apart (FedAvg over the arrays).

Averaging A and B separately is not the mean of the clients' products ``s * B @ A``: the
aggregation residual says by how much. Every default of :class:`AdapterCodec` is fedavg's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from fedswarm.common.codecs.base import AdapterCodec
from fedswarm.common.codecs.product import State, weighted_mean
from fedswarm.common.contract import Reply

if TYPE_CHECKING:
    import torch
    from flwr.serverapp.strategy import Strategy


class FedAvgCodec(AdapterCodec):
    name: ClassVar[str] = "fedavg"
    help: ClassVar[str] = "A, B averaged apart"

    def strategy(self, min_clients: int, central_dp: bool = False) -> Strategy:
        """Flower's FedAvg (sampling, metrics) aggregating through :meth:`aggregate`; under central DP
        Flower's own, unchanged, as its accounting requires (equal weights: user-level DP)."""
        from fedswarm.common.codecs.strategies import FlowerFedAvg, LoraFedAvg

        if central_dp:
            return FlowerFedAvg(min_clients, self.fraction_evaluate, Reply.UNIT_WEIGHT)
        return LoraFedAvg(self, min_clients, self.fraction_evaluate)

    def aggregate(self, states: Sequence[State], weights: Sequence[float], prior: State) -> dict[str, torch.Tensor]:
        """The weighted mean of the replies' tensors (Flower FedAvg's rule, summed in float64)."""
        return weighted_mean(states, weights)
