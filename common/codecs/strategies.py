"""The Flower strategies the codecs aggregate with (Flower's FedAvg, its sampling and metrics untouched).

Only ``aggregate_train`` is the codec's: each reply's adapter is taken from the codec's
decode cache (decoded once, when the coordinator screened it) and combined by the codec's
own rule. Imported lazily: Flower's strategies take a second to import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedswarm.common.contract import Reply, from_record, number

if TYPE_CHECKING:
    from fedswarm.common.codecs.fedavg import FedAvgCodec
    from fedswarm.common.codecs.svd import SvdCodec


def _fedavg_settings(min_clients: int, fraction_evaluate: float, weighted_by_key: str) -> dict[str, Any]:
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": min_clients,
        "min_evaluate_nodes": min_clients if fraction_evaluate > 0 else 0,
        "min_available_nodes": min_clients,
        "weighted_by_key": weighted_by_key,
    }


class FlowerFedAvg(FedAvg):
    """Flower's FedAvg as it is, ``aggregate_train`` included: what Flower's central DP accounting requires
    (it re-encodes the clipped replies, so they are decoded again there)."""

    def __init__(
        self, min_clients: int, fraction_evaluate: float = 0.0, weighted_by_key: str = Reply.UNIT_WEIGHT
    ) -> None:
        super().__init__(**_fedavg_settings(min_clients, fraction_evaluate, weighted_by_key))


class LoraFedAvg(FedAvg):
    """FedAvg over the LoRA arrays a codec sends (both factors, or only B under ffa), from its decode cache."""

    def __init__(
        self,
        codec: FedAvgCodec,
        min_clients: int,
        fraction_evaluate: float = 0.0,
        weighted_by_key: str = Reply.NUM_EXAMPLES,
    ) -> None:
        super().__init__(**_fedavg_settings(min_clients, fraction_evaluate, weighted_by_key))
        self.codec = codec

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        weights = [number(r.content["metrics"], self.weighted_by_key) for r in valid]
        state = self.codec.aggregate([self.codec.decode(r) for r in valid], weights, {})
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return ArrayRecord(state), metrics


class LoraSvd(FedAvg):
    """Aggregate ``sum p s B A`` per layer and truncate its SVD at the global rank (:class:`SvdCodec`).

    Clients may have different ranks. A ``--server-lr`` other than 1 steps in product space:
    the global adapter sent this round (``configure_train``) joins the sum with weight
    ``1 - server_lr`` (:func:`product.server_step`).
    """

    def __init__(self, codec: SvdCodec, min_clients: int, fraction_evaluate: float = 0.0) -> None:
        super().__init__(**_fedavg_settings(min_clients, fraction_evaluate, Reply.NUM_EXAMPLES))
        self.codec = codec
        self.prior: dict = {}

    @property
    def last_residual(self) -> float:
        return self.codec.last_residual

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.prior = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        state = self.codec.aggregate([self.codec.client(r, self.prior) for r in valid], self.prior)
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return ArrayRecord(state), metrics
