"""fedavg: both LoRA factors travel, train and are averaged apart (FedAvg over the arrays).

Averaging A and B separately is not the mean of the clients' products ``s * B @ A``: the
aggregation residual says by how much. Every default of :class:`AdapterCodec` is fedavg's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedswarm.common.codecs.base import AdapterCodec, Aggregate
from fedswarm.common.codecs.product import Client, State, weighted_mean


class FedAvgCodec(AdapterCodec):
    name: ClassVar[str] = "fedavg"
    help: ClassVar[str] = "A, B averaged apart"

    def aggregate(self, clients: Sequence[Client], prior: State, server_lr: float = 1.0) -> Aggregate:
        """The weighted mean of the tensors the nodes train (Flower FedAvg's rule, summed in float64)."""
        trained = [{k: v for k, v in c.state.items() if self.trainable(k)} for c in clients]
        mean = weighted_mean(trained, [c.weight for c in clients])
        return Aggregate(mean, self.residual(clients, mean, prior, server_lr))
