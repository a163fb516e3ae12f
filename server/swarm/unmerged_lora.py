"""Unmerged LoRA adapters applied per row: ``out = base(x) + scale · (x Aᵀ) Bᵀ`` on each targeted linear.

The base span is held once; any number of adapters ride along as small ``(A, B)`` pairs. A
batch may hold rows of different adapters (continuous batching of sessions): the rows of
each adapter are contiguous, and each linear adds every group's delta to its own rows only,
the way PEFT's ``LoraLayer.forward`` adds one adapter's (``lora_B(lora_A(x)) * scaling``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.adapter_digest import ADAPTER_FILES, digest_of

if TYPE_CHECKING:
    import torch

    from fedswarm.server.swarm.blocks import SpanModel


@dataclass(frozen=True, eq=False)
class SpanAdapter:
    """One version of a named adapter, restricted to a span's blocks; immutable once loaded,
    so a session that holds it keeps computing with it after the server loads a newer one."""

    name: str
    digest: str  # :func:`fedswarm.common.adapter_digest.adapter_id` of the files it was read from
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (local layer, module) -> (A, B)


@dataclass(frozen=True)
class RowGroup:
    """Rows ``start..end-1`` of a batch use ``adapter``."""

    start: int
    end: int
    adapter: SpanAdapter


def load_unmerged(span: SpanModel, name: str, folder: Path) -> SpanAdapter:
    """Read ``folder`` once (digest and tensors from the same bytes) and keep its span's pairs on the span's device."""
    from safetensors.torch import load as load_bytes

    from fedswarm.server.swarm.merged_adapter import parse_lora

    contents = [(folder / file).read_bytes() for file in ADAPTER_FILES]
    config = json.loads(contents[0].decode("utf-8"))
    scale, pairs = parse_lora(span, folder, config, load_bytes(contents[1]))
    device, dtype = span.device, span.dtype
    weights = {key: (a.to(device, dtype), b.to(device, dtype)) for key, (a, b) in pairs.items()}
    return SpanAdapter(name=name, digest=digest_of(contents), scale=scale, weights=weights)


class LoraHooks:
    """Forward hooks on every linear of the span's blocks that add the current row groups' deltas.

    Installed once, the first time a span computes with an adapter; without row groups a hook
    returns at once, so base-model requests cost a few Python calls per layer.
    """

    def __init__(self, layers: Any) -> None:
        import torch

        self.groups: Sequence[RowGroup] = ()
        self._handles: list[Any] = []
        for index, layer in enumerate(layers):
            for path, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    self._handles.append(module.register_forward_hook(partial(self._hook, (index, path))))

    @contextmanager
    def applied(self, groups: Sequence[RowGroup]) -> Iterator[None]:
        """Row groups for the forward passes inside the block (one compute thread at a time)."""
        self.groups = groups
        try:
            yield
        finally:
            self.groups = ()

    def _hook(self, key: tuple[int, str], module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
        import torch.nn.functional as F  # noqa: N812

        if not self.groups:
            return None
        x = inputs[0]
        for group in self.groups:
            pair = group.adapter.weights.get(key)
            if pair is None:
                continue
            a, b = pair
            if group.start == 0 and group.end == output.shape[0]:
                output = output + F.linear(F.linear(x, a), b) * group.adapter.scale
                continue
            rows = slice(group.start, group.end)
            output[rows] = output[rows] + F.linear(F.linear(x[rows], a), b) * group.adapter.scale
        return output
