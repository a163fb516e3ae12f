"""LoRA aggregation arithmetic: weighted means, residuals in product space, the SVD re-factorisation.

A LoRA layer contributes ``s * B @ A`` (``s = alpha / r``) to its weight. Averaging A
and B separately (fedavg) does not average those products; freezing A (ffa) or
aggregating the products and re-factorising them (svd) does. All functions here are
pure: dicts of tensors in, tensors out. The codecs (``fedavg.py``, ``ffa.py``, ``svd.py``)
decide which of them a mode uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

State = Mapping[str, "torch.Tensor"]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class Client:
    state: State  # full adapter: every layer's lora_A and lora_B
    weight: float  # aggregation weight (examples), normalised by the caller or not
    scale: float  # alpha / rank of this client's adapter


def server_step(clients: Sequence[Client], prior: State | None, prior_scale: float, lr: float) -> list[Client]:
    """The clients as a server step of size ``lr`` sees them: ``(1 - lr) s' B' A' + lr sum p s B A`` as one sum.

    ``prior`` is the global adapter the clients started from (scale ``prior_scale``). FedOpt's
    server SGD moves it ``lr`` times the clients' mean update; in product space that is the
    weighted sum above, so :func:`weighted_product`, :func:`residual` and :func:`svd_aggregate`
    take it unchanged (weights keep their total; the prior's is negative when ``lr`` > 1).
    """
    if lr == 1.0 or prior is None:
        return list(clients)
    total = sum(c.weight for c in clients)
    return [Client(prior, (1.0 - lr) * total, prior_scale), *(Client(c.state, lr * c.weight, c.scale) for c in clients)]


def apply_server_lr(prior: State, aggregated: State, lr: float) -> dict[str, torch.Tensor]:
    """Factor-wise server SGD: each aggregated array moved ``lr`` times its change from ``prior``."""
    if lr == 1.0:
        return dict(aggregated)
    return {k: prior[k] + lr * (v - prior[k]) if k in prior else v for k, v in aggregated.items()}


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_k w_k x_k / sum_k w_k`` per tensor, summed in float64 in the given order, in each tensor's dtype."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        acc = sum((w / total) * s[key].double() for s, w in zip(states, weights, strict=True))
        out[key] = acc.to(first.dtype)  # type: ignore[union-attr]
    return out


def layers(state: State) -> list[str]:
    """Layer prefixes that have both factors, in a stable order."""
    return sorted(
        k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in state
    )


def weighted_product(clients: Sequence[Client], layer: str) -> torch.Tensor:
    """``sum_k p_k s_k B_k A_k`` for one layer, with ``p`` the normalised weights."""
    total = sum(c.weight for c in clients)
    out = None
    for c in clients:
        term = (c.weight / total) * c.scale * (c.state[layer + B_SUFFIX].double() @ c.state[layer + A_SUFFIX].double())
        out = term if out is None else out + term
    assert out is not None
    return out


def residual(clients: Sequence[Client], aggregate: State, scale: float) -> float:
    """``||sum p s B A - s' B' A'||_F / ||sum p s B A||_F`` over all layers (0 when exact)."""
    num = den = 0.0
    for layer in layers(aggregate):
        target = weighted_product(clients, layer)
        got = scale * (aggregate[layer + B_SUFFIX].double() @ aggregate[layer + A_SUFFIX].double())
        num += float(((target - got) ** 2).sum())
        den += float((target**2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


@dataclass(frozen=True)
class SvdResult:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (U*sqrt(S), sqrt(S)*V^T), rank = kept
    residual: float  # relative Frobenius error of the rank-``global_rank`` truncation


def svd_aggregate(clients: Sequence[Client], global_rank: int) -> SvdResult:
    """Truncated SVD of each layer's ``sum p s B A`` at ``global_rank``.

    The product has rank at most ``sum r_k``, so it is factored through thin QRs of the
    stacked factors and an SVD of a small ``(sum r_k)``-square matrix: exact, and cheap
    even for wide layers. Truncation at rank R is the best rank-R approximation
    (Eckart-Young), so its error is never above fedavg's; it is zero when R >= sum r_k.
    """
    import torch

    if global_rank < 1:
        raise ValueError(f"--global-rank must be >= 1, got {global_rank}")
    total = sum(c.weight for c in clients)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tail = full = 0.0
    for layer in layers(clients[0].state):
        bs = [c.state[layer + B_SUFFIX].double() * (c.weight / total * c.scale) for c in clients]
        as_ = [c.state[layer + A_SUFFIX].double() for c in clients]
        q_b, r_b = torch.linalg.qr(torch.cat(bs, dim=1))  # (out, k), (k, k)
        q_a, r_a = torch.linalg.qr(torch.cat(as_, dim=0).T)  # (in, k), (k, k)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        keep = min(global_rank, s.numel())
        root = s[:keep].sqrt()
        factors[layer] = ((q_b @ u[:, :keep]) * root, root[:, None] * (vh[:keep] @ q_a.T))
        tail += float((s[keep:] ** 2).sum())
        full += float((s**2).sum())
    return SvdResult(factors, (tail / full) ** 0.5 if full > 0 else 0.0)


def svd_state(result: SvdResult, rank: int, scale: float) -> dict[str, torch.Tensor]:
    """A rank-``rank`` adapter state (float32) with ``scale * B @ A`` = the truncated product.

    A client of a smaller rank than the global one receives the leading components;
    one of a larger rank gets the extra rows/columns as zeros.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for layer, (b, a) in result.factors.items():
        keep = min(rank, b.shape[1])
        b_r = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        a_r = torch.zeros(rank, a.shape[1], dtype=torch.float64)
        b_r[:, :keep] = b[:, :keep] / scale**0.5
        a_r[:keep] = a[:keep] / scale**0.5
        out[layer + B_SUFFIX] = b_r.float()
        out[layer + A_SUFFIX] = a_r.float()
    return out
