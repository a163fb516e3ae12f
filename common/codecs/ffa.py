"""ffa (federated freeze-A): every node keeps the shared seeded A frozen; only B travels and trains.

With one A for all, the mean of the B's is exactly the mean product ``s * B @ A``, so the
aggregation residual is zero (float round-off), and the payload is half fedavg's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from fedswarm.common.codecs.fedavg import FedAvgCodec
from fedswarm.common.codecs.product import State

if TYPE_CHECKING:
    import torch


class FfaCodec(FedAvgCodec):
    name: ClassVar[str] = "ffa"
    help: ClassVar[str] = "A frozen"
    trains_a: ClassVar[bool] = False

    def outgoing(self, state: State) -> dict[str, torch.Tensor]:
        """Only B: every node already holds the shared A (its LoRA seed's)."""
        return {k: v for k, v in state.items() if self.trainable(k)}

    def rebuild(self, current: State, received: State, rank: int) -> dict[str, torch.Tensor]:
        """The node's own (seeded, frozen) A with the received B."""
        return super().rebuild(
            current, {**{k: v for k, v in current.items() if not self.trainable(k)}, **received}, rank
        )
