"""A prompt prefix every row of a batch shares, computed once and reused as a KV cache.

Chat data repeats its system prompt in every example (sarcasm: 31 of ~53 tokens), so a
batch spends most of its compute on tokens that are identical in every row. The prefix
runs once (batch 1); each row then runs only its own suffix, attending to the prefix's keys
and values broadcast over the batch. Causal attention makes this exact: a prefix token never
sees what follows it, so its hidden states are the same in every row. Gradients stay exact
too: the suffixes' gradients with respect to the prefix's keys and values are summed over the
rows and micro-batches, then sent back through the one prefix pass (``PrefixCache.backward``).

Per-example gradients (Opacus' DP-SGD) cannot share a prefix: its gradient would mix every
example's. The DP path runs whole rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.common.batches import Encoded

if TYPE_CHECKING:
    import torch

# Shorter common prefixes are not worth a separate pass.
MIN_SHARED_PREFIX = 8


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shared_prefix_len(rows: Sequence[Encoded], minimum: int = MIN_SHARED_PREFIX) -> int:
    """Tokens every row starts with, stopping before any row's last prompt token (0 if under ``minimum``).

    The last prompt token's position predicts the first answer token, so it stays in every
    row's suffix, where its logits are computed.
    """
    if not rows:
        return 0
    limit = min(r.prompt_len for r in rows) - 1
    common = len(os.path.commonprefix([r.input_ids for r in rows]))  # on sequences of any items
    n = max(0, min(limit, common))
    return n if n >= minimum else 0


def suffixes(rows: Sequence[Encoded], prefix_len: int) -> list[Encoded]:
    """Each row without its first ``prefix_len`` tokens (the prompt length shifted to match)."""
    return [Encoded(r.input_ids[prefix_len:], r.prompt_len - prefix_len) for r in rows]


@dataclass
class PrefixCache:
    """The prefix's keys and values per layer (batch 1), and how to run suffixes against them.

    ``trainable``: the keys and values are leaves whose gradients accumulate over every
    suffix pass; ``backward()`` then sends them through the prefix pass once.
    """

    states: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value), shape (1, heads, P, head_dim)
    sources: list[torch.Tensor] | None = None  # the prefix pass's outputs the leaves were cut from (training)

    @property
    def length(self) -> int:
        return int(self.states[0][0].shape[-2])

    @classmethod
    def compute(cls, model: Any, prefix_ids: Sequence[int], trainable: bool = False) -> PrefixCache:
        """Run the prefix once through the decoder (with gradients when ``trainable``)."""
        import torch
        from transformers import DynamicCache

        base = base_model(model)
        device = next(base.parameters()).device
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        cache = DynamicCache(config=base.config)
        base.get_decoder()(input_ids=ids, past_key_values=cache, use_cache=True)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in cache.layers:
            if layer.keys is None or layer.values is None:
                raise RuntimeError("the prefix pass left a layer of its KV cache empty")
            pairs.append((layer.keys, layer.values))
        if not trainable:
            return cls(pairs)
        sources = [t for pair in pairs for t in pair]
        leaves = [(k.detach().requires_grad_(True), v.detach().requires_grad_(True)) for k, v in pairs]
        return cls(leaves, sources)

    def for_batch(self, rows: int) -> Any:
        """A fresh cache holding the prefix for ``rows`` rows (a forward pass appends to it)."""
        from transformers import DynamicCache

        expanded = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.states]
        return DynamicCache(expanded)

    def hidden(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's last hidden states of the suffix ``batch`` (right-padded) after the prefix."""
        import torch

        base = base_model(model)
        mask = batch["attention_mask"]
        full = torch.cat([mask.new_ones(mask.shape[0], self.length), mask], dim=1)
        out = base.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=full,
            past_key_values=self.for_batch(mask.shape[0]),
            use_cache=True,
        )
        return out.last_hidden_state

    def backward(self) -> None:
        """Send the gradients the suffix passes left on the prefix's keys and values through the prefix pass."""
        import torch

        if self.sources is None:
            raise RuntimeError("PrefixCache.backward() needs a cache computed with trainable=True")
        leaves = [t for pair in self.states for t in pair]
        pairs = [(s, t.grad) for s, t in zip(self.sources, leaves, strict=True) if t.grad is not None]
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])
        self.sources = None
