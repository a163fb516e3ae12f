"""svd: nodes train both factors at their own ranks; the coordinator averages the products and re-factorises.

The weighted mean of ``s * B @ A`` is truncated to the global rank by an SVD (the best
approximation at that rank; exact when the global rank is at least the sum of the client
ranks). Each node receives the global adapter at its own rank; ``--server-lr`` steps in
product space inside the aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from fedswarm.common.codecs.base import AdapterCodec, Aggregate, shapes_at_rank
from fedswarm.common.codecs.product import Client, State, server_step, svd_aggregate, svd_state

if TYPE_CHECKING:
    import torch

    from fedswarm.common.config import NodeSettings


class SvdCodec(AdapterCodec):
    name: ClassVar[str] = "svd"
    help: ClassVar[str] = "product + SVD"
    mixed_ranks: ClassVar[bool] = True
    scaffold: ClassVar[bool] = False
    central_dp: ClassVar[bool] = False
    server_optimizers: ClassVar[bool] = False

    @classmethod
    def global_rank(cls, cfg: NodeSettings) -> int:
        # a node's settings carry no --global-rank (the coordinator's): nodes never need it
        return int(getattr(cfg, "global_rank", 0)) or max(cfg.ranks())

    def personal(self, state: State, rank: int | None) -> dict[str, torch.Tensor] | None:
        """The global adapter re-expressed at the node's own rank (leading components, same product)."""
        from fedswarm.common.lora_state import resize_rank

        if rank is None or rank == self.rank:
            return None
        return resize_rank(state, rank, self.alpha / self.rank, self.alpha / rank)

    def expected_shapes(self, sent: State, rank: object) -> dict[str, tuple[int, ...]]:
        """The node replies at the rank it reports (``lora-rank``), whatever rank it was sent."""
        shapes = super().expected_shapes(sent, rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            return shapes
        return shapes_at_rank(shapes, rank)

    def aggregate(self, clients: Sequence[Client], prior: State, server_lr: float = 1.0) -> Aggregate:
        """The server-stepped mean product truncated at the global rank; its residual is the truncation's
        own error (exactly the product-space residual, computed for free)."""
        stepped = server_step(clients, prior, self.alpha / self.rank, server_lr)
        result = svd_aggregate(stepped, self.rank)
        return Aggregate(svd_state(result, self.rank, self.alpha / self.rank), result.residual)

    def complete(self, aggregated: State, prior: State, server_lr: float = 1.0) -> dict[str, torch.Tensor]:
        """The aggregate already is the next adapter (the server step happened in product space)."""
        return dict(aggregated)
