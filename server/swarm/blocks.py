"""Block compute: a contiguous span of decoder blocks, and the KV cache of one session.

A :class:`SpanModel` is what a block server holds: blocks ``start..end-1`` of the model and
the rotary table, nothing else. Its layers are indexed locally (0..n-1) so a session's cache
has exactly one slot per hosted block. Weights and caches live on the span's device (CPU or
CUDA); hidden states come and go on the caller's device (CPU for the wire).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import ModelSpec, model_folder

if TYPE_CHECKING:
    import torch

    from fedswarm.server.swarm.unmerged_lora import LoraHooks, RowGroup, SpanAdapter

log = logging.getLogger("fedswarm.swarm.blocks")

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class SpanCache:
    """A preallocated KV cache for ``n_layers`` blocks and ``max_length`` tokens.

    Preallocating makes the memory bound exact (the server reserves :attr:`nbytes` before it
    accepts a session) and avoids re-copying the cache at every step. It quacks like the one
    method of transformers' ``Cache`` the attention layers call: :meth:`update`.
    """

    def __init__(
        self, n_layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int, dtype: Any, device: Any = "cpu"
    ) -> None:
        import torch

        shape = (n_layers, batch, kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens committed
        self.max_length = max_length

    @staticmethod
    def size_bytes(n_layers: int, batch: int, kv_heads: int, head_dim: int, max_length: int, itemsize: int) -> int:
        return 2 * n_layers * batch * kv_heads * max_length * head_dim * itemsize

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key.shape[2]
        self.keys[layer_idx, :, :, self.length : end] = key
        self.values[layer_idx, :, :, self.length : end] = value
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]


class BatchCache:
    """Several sessions' caches seen as one batch for a decode step (one new token per row).

    Each session's new key/value goes into its own cache; attention gets the sessions' keys
    right-padded to the longest (plus the new token), and a mask hides the padding. The padded
    buffers are reused from layer to layer: stale values there are finite and always masked.
    """

    def __init__(self, caches: Sequence[SpanCache], rows: Sequence[tuple[int, int]]) -> None:
        self.caches, self.rows = caches, rows
        self.width = max(c.length for c in caches) + 1
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self._buffers is None:
            shape = (key.shape[0], key.shape[1], self.width, key.shape[3])
            self._buffers = (
                torch.zeros(shape, dtype=key.dtype, device=key.device),
                torch.zeros(shape, dtype=value.dtype, device=value.device),
            )
        keys, values = self._buffers
        for cache, (first, last) in zip(self.caches, self.rows, strict=True):
            end = cache.length + 1
            cache.keys[layer_idx, :, :, cache.length] = key[first:last, :, 0]
            cache.values[layer_idx, :, :, cache.length] = value[first:last, :, 0]
            keys[first:last, :, :end] = cache.keys[layer_idx, :, :, :end]
            values[first:last, :, :end] = cache.values[layer_idx, :, :, :end]
        return keys, values


@dataclass
class SpanModel:
    """Blocks ``start..end-1`` of a model, ready to run hidden states through."""

    config: Any
    layers: Any  # torch.nn.ModuleList, indexed locally
    rotary: Any  # LlamaRotaryEmbedding
    start: int
    end: int
    lora: LoraHooks | None = None  # installed the first time an unmerged adapter is used

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.layers.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.layers.parameters()).device

    def to(self, device: Any) -> SpanModel:
        """Move the span's weights and rotary table to ``device`` (in place); returns the span."""
        self.layers.to(device)
        self.rotary.to(device)
        return self

    def param_bytes(self) -> int:
        """Bytes of every tensor this span holds (parameters and buffers)."""
        tensors = [*self.layers.parameters(), *self.layers.buffers(), *self.rotary.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def new_cache(self, start: int, end: int, batch: int, max_length: int) -> SpanCache:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return SpanCache(end - start, batch, cfg.num_key_value_heads, head_dim, max_length, self.dtype, self.device)

    def cache_bytes(self, start: int, end: int, batch: int, max_length: int) -> int:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = next(self.layers.parameters()).element_size()
        return SpanCache.size_bytes(end - start, batch, cfg.num_key_value_heads, head_dim, max_length, itemsize)

    def forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: SpanCache | None = None,
        adapter: SpanAdapter | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` ([batch, new, hidden]) through blocks ``start..end-1`` (global indices).

        Without a cache the sequence starts at position 0 (stateless ``Forward``); with one it
        continues after the ``cache.length`` tokens the cache holds, and commits the new ones.
        ``adapter`` (unmerged LoRA) applies to every row. Compute runs on the span's device; the
        result comes back on ``hidden``'s device and dtype.
        """
        import torch

        from fedswarm.server.swarm.unmerged_lora import RowGroup

        device = self.device
        past = cache.length if cache is not None else 0
        new = hidden.shape[1]
        positions = torch.arange(past, past + new, device=device).unsqueeze(0).expand(hidden.shape[0], -1)
        mask = None
        if past > 0 and new > 1:  # sdpa's is_causal aligns top-left; spell the mask out
            rows = torch.arange(new, device=device).unsqueeze(1) + past
            mask = (torch.arange(past + new, device=device).unsqueeze(0) <= rows)[None, None]
        x = hidden.to(device=device, dtype=self.dtype)
        groups = [RowGroup(0, hidden.shape[0], adapter)] if adapter is not None else []
        x = self._layers(x, start, end, mask, positions, cache, groups)
        if cache is not None:
            cache.length += new
        return x.to(device=hidden.device, dtype=hidden.dtype)

    def forward_batch(
        self,
        hiddens: Sequence[torch.Tensor],
        caches: Sequence[SpanCache],
        start: int,
        end: int,
        adapters: Sequence[SpanAdapter | None],
    ) -> list[torch.Tensor]:
        """One decode step of several sessions at once: each ``hiddens[i]`` is [batch_i, 1, hidden]
        continuing ``caches[i]`` under ``adapters[i]``; returns each session's output.

        Rows keep their own positions (their cache lengths) and see only their own cache; a
        session's result does not depend on what else is in the batch, up to float round-off.
        """
        import torch

        from fedswarm.server.swarm.unmerged_lora import RowGroup

        if len(hiddens) == 1:
            return [self.forward(hiddens[0], start, end, caches[0], adapters[0])]
        device = self.device
        rows: list[tuple[int, int]] = []
        groups: list[RowGroup] = []
        first = 0
        for hidden, adapter in zip(hiddens, adapters, strict=True):
            rows.append((first, first + hidden.shape[0]))
            if adapter is not None:
                if groups and groups[-1].adapter is adapter and groups[-1].end == first:
                    groups[-1] = RowGroup(groups[-1].start, first + hidden.shape[0], adapter)
                else:
                    groups.append(RowGroup(first, first + hidden.shape[0], adapter))
            first += hidden.shape[0]
        lengths = torch.tensor(
            [cache.length for cache, (a, b) in zip(caches, rows, strict=True) for _ in range(a, b)], device=device
        )
        batch_cache = BatchCache(caches, rows)
        positions = lengths.unsqueeze(1)
        mask = (torch.arange(batch_cache.width, device=device).unsqueeze(0) <= positions)[:, None, None, :]
        x = torch.cat([h.to(device=device, dtype=self.dtype) for h in hiddens])
        x = self._layers(x, start, end, mask, positions, batch_cache, groups)
        for cache in caches:
            cache.length += 1
        return [x[a:b].to(device=h.device, dtype=h.dtype) for (a, b), h in zip(rows, hiddens, strict=True)]

    def _layers(
        self,
        x: torch.Tensor,
        start: int,
        end: int,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: SpanCache | BatchCache | None,
        groups: Sequence[RowGroup],
    ) -> torch.Tensor:
        """Blocks [start, end) over ``x`` under ``groups``' adapters; with a cache, each layer reads its own slot."""
        import torch

        with torch.inference_mode(), self._adapted(groups):
            embeddings = self.rotary(x, positions)
            for i in range(start - self.start, end - self.start):
                layer = self.layers[i]
                if cache is not None:
                    layer.self_attn.layer_idx = i - (start - self.start)
                x = layer(
                    x,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    position_embeddings=embeddings,
                )
        return x

    def _adapted(self, groups: Sequence[RowGroup]) -> AbstractContextManager[None]:
        if not groups:
            return nullcontext()
        if self.lora is None:
            from fedswarm.server.swarm.unmerged_lora import LoraHooks

            self.lora = LoraHooks(self.layers)
        return self.lora.applied(groups)


def load_span(spec: ModelSpec, start: int, end: int, device: str = "cpu") -> SpanModel:
    """Build blocks ``start..end-1`` of ``spec`` on ``device`` ("cpu" or "cuda") and load only their weights."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from fedswarm.common.weights import read_tensors

    config = _config(spec)
    total = int(config.num_hidden_layers)
    if not 0 <= start < end <= total:
        raise FedswarmError(f"--blocks {start}:{end}: the model has blocks 0:{total} (END is exclusive)")
    config._attn_implementation = "sdpa"
    if spec.name == "tiny":
        layers = _tiny_layers(start, end)
    else:
        with torch.device("meta"):
            layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(end - start))
        state = {}
        for name, tensor in read_tensors(model_folder(spec), lambda n: _in_span(n, start, end)):
            index, rest = _LAYER_KEY.match(name).groups()  # type: ignore[union-attr]
            state[f"{int(index) - start}.{rest}"] = tensor.to(device=device, dtype=torch.float32)
        layers.load_state_dict(state, strict=True, assign=True)
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    layers.eval()
    span = SpanModel(config=config, layers=layers, rotary=LlamaRotaryEmbedding(config), start=start, end=end)
    return span.to(device)


def block_bytes(spec: ModelSpec, start: int, end: int) -> int:
    """Bytes of blocks ``start..end-1`` in the model's files, without loading them."""
    from fedswarm.common.weights import tensor_bytes

    return tensor_bytes(model_folder(spec), lambda n: _in_span(n, start, end))


def num_blocks(spec: ModelSpec) -> int:
    return int(_config(spec).num_hidden_layers)


def _in_span(name: str, start: int, end: int) -> bool:
    match = _LAYER_KEY.match(name)
    return match is not None and start <= int(match.group(1)) < end


def _tiny_layers(start: int, end: int) -> Any:
    # The tiny model exists only as a seeded construction; it is a few MB, so build it and keep the span.
    import torch

    from fedswarm.common.model import load_model

    full = load_model(ModelSpec("tiny"))
    return torch.nn.ModuleList(list(full.model.layers[start:end]))


def _config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    from fedswarm.common.model import tiny_config

    if spec.name == "tiny":
        return tiny_config()
    config = AutoConfig.from_pretrained(model_folder(spec))
    if config.model_type != "llama":
        raise FedswarmError(f"--model: the swarm serves Llama-architecture models, this one is {config.model_type!r}")
    return config
