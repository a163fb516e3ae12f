"""Server-side optimisers over the aggregated adapter (FedOpt, Reddi et al. 2021), as Flower computes them.

The round's pseudo-gradient is ``delta = aggregate - x`` (``x`` the adapter the round
started from) over the tensors the nodes train: both factors under fedavg (factor by factor,
as ``--server-lr`` moves them), B under ffa, where the aggregate is linear in what the nodes
send, so every optimiser applies to the exact mean. svd re-factorises a product-space mean,
whose factors are not a linear function of the replies: it takes server SGD only.

- ``sgd``: ``x + lr * delta`` (``--server-lr`` 1 is plain averaging);
- ``avgm`` (Flower's FedAvgM): ``m = momentum * m + delta``, ``x + lr * m``;
- ``adam`` (Flower's FedAdam): ``m = b1 m + (1 - b1) delta``, ``v = b2 v + (1 - b2) delta^2``,
  ``x + lr_t m / (sqrt(v) + tau)`` with Flower's bias correction
  ``lr_t = lr sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` at server round t;
- ``yogi`` (Flower's FedYogi): ``v = v - (1 - b2) delta^2 sign(v - delta^2)``, ``x + lr m / (sqrt(v) + tau)``.

The moments are the optimiser's only state: returned by ``state_dict`` into each round's
checkpoint, so ``--resume`` continues them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")
DEFAULT_SERVER_LR = {"sgd": 1.0, "avgm": 1.0, "adam": 1e-2, "yogi": 1e-2}  # --server-lr 0


@dataclass
class ServerOptimizer:
    kind: str
    lr: float
    momentum: float = 0.9  # avgm
    beta1: float = 0.9  # adam, yogi
    beta2: float = 0.99  # adam, yogi
    tau: float = 1e-3  # adam, yogi: adaptivity (added to sqrt(v))
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"--server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.kind!r}")

    @property
    def stateful(self) -> bool:
        return self.kind != "sgd"

    def step(
        self, server_round: int, start: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The next adapter: ``aggregate``'s keys moved from ``start`` by this optimiser (float64 inside)."""
        out: dict[str, torch.Tensor] = {}
        for key, new in aggregate.items():
            x = start[key].double()
            delta = new.double() - x
            out[key] = (x + self._update(key, delta, server_round)).to(new.dtype)
        return out

    def _update(self, key: str, delta: torch.Tensor, t: int) -> torch.Tensor:
        import torch

        if self.kind == "sgd":
            return self.lr * delta
        if self.kind == "avgm":
            self.m[key] = self.momentum * self.m[key] + delta if key in self.m else delta.clone()
            return self.lr * self.m[key]
        m = self.m.get(key, torch.zeros_like(delta))
        v = self.v.get(key, torch.zeros_like(delta))
        self.m[key] = m = self.beta1 * m + (1.0 - self.beta1) * delta
        if self.kind == "adam":
            self.v[key] = v = self.beta2 * v + (1.0 - self.beta2) * delta**2
            lr = self.lr * (1.0 - self.beta2 ** (t + 1.0)) ** 0.5 / (1.0 - self.beta1 ** (t + 1.0))
        else:  # yogi
            self.v[key] = v = v - (1.0 - self.beta2) * delta**2 * torch.sign(v - delta**2)
            lr = self.lr
        return lr * m / (v.sqrt() + self.tau)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments, as flat tensors (``m/KEY``, ``v/KEY``) for a safetensors checkpoint."""
        return {f"m/{k}": t.contiguous() for k, t in self.m.items()} | {
            f"v/{k}": t.contiguous() for k, t in self.v.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: t.double() for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t.double() for k, t in state.items() if k.startswith("v/")}
