"""LoRA FedAvg: Flower's FedAvg over the adapter arrays, weighted by examples."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class LoraFedAvg(FedAvg):
    """FedAvg of the LoRA A and B matrices separately (FlowerTune's baseline; not exact).

    Train metrics (``train-loss``, ``seconds``, ...) are averaged weighted by
    ``num-examples``, like the arrays.
    """

    def __init__(self, min_clients: int, fraction_evaluate: float = 0.0) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients if fraction_evaluate > 0 else 0,
            min_available_nodes=min_clients,
            weighted_by_key="num-examples",
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, replies)
