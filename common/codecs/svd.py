"""svd: nodes train both factors at their own ranks; the coordinator averages the products and re-factorises.

The weighted mean of ``s * B @ A`` is truncated to the global rank by an SVD (the best
approximation at that rank; exact when the global rank is at least the sum of the client
ranks). Each node receives the global adapter at its own rank; ``--server-lr`` steps in
product space inside the aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fedswarm.common.codecs.base import AdapterCodec, shapes_at_rank
from fedswarm.common.codecs.product import Client, State, server_step, svd_aggregate, svd_state

if TYPE_CHECKING:
    import torch
    from flwr.app import Message
    from flwr.serverapp.strategy import Strategy

    from fedswarm.common.config import FederationConfig


class SvdCodec(AdapterCodec):
    name: ClassVar[str] = "svd"
    help: ClassVar[str] = "product + SVD"
    mixed_ranks: ClassVar[bool] = True
    scaffold: ClassVar[bool] = False
    central_dp: ClassVar[bool] = False
    server_optimizers: ClassVar[bool] = False

    def __init__(self, cfg: FederationConfig) -> None:
        super().__init__(cfg)
        self.last_residual = 0.0

    @classmethod
    def global_rank(cls, cfg: FederationConfig) -> int:
        return cfg.global_rank or max(cfg.ranks())

    def personal(self, state: State, rank: int | None) -> dict[str, torch.Tensor] | None:
        """The global adapter re-expressed at the node's own rank (leading components, same product)."""
        from fedswarm.common.lora import resize_rank

        if rank is None or rank == self.rank:
            return None
        return resize_rank(state, rank, self.alpha / self.rank, self.alpha / rank)

    def expected_shapes(self, sent: State, rank: object) -> dict[str, tuple[int, ...]]:
        """The node replies at the rank it reports (``lora-rank``), whatever rank it was sent."""
        shapes = super().expected_shapes(sent, rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            return shapes
        return shapes_at_rank(shapes, rank)

    def strategy(self, min_clients: int, central_dp: bool = False) -> Strategy:
        from fedswarm.common.codecs.strategies import LoraSvd

        return LoraSvd(self, min_clients, self.fraction_evaluate)

    def aggregate(self, clients: Sequence[Client], prior: State) -> dict[str, torch.Tensor]:
        """The server-stepped mean product, truncated at the global rank; records the truncation's residual."""
        stepped = server_step(clients, prior, self.alpha / self.rank, self.server_lr)
        result = svd_aggregate(stepped, self.rank)
        self.last_residual = result.residual
        return svd_state(result, self.rank, self.alpha / self.rank)

    def complete(self, aggregated: State, prior: State) -> dict[str, torch.Tensor]:
        """The aggregate already is the next adapter (the server step happened in product space)."""
        return dict(aggregated)

    def residual(self, strategy: Any, replies: Iterable[Message], new: State, prior: State) -> float:
        """The SVD's own truncation error (exactly the product-space residual, computed for free)."""
        return self.last_residual
