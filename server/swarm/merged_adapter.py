"""Reading a PEFT LoRA adapter for a span's blocks, and merging it: ``W += (alpha / r) · B @ A``.

A server reads only the adapter tensors of the blocks it hosts. Merged (``--adapter DIR``),
the blocks then cost nothing extra per token; unmerged (``--adapter NAME=DIR``, see
``server/swarm/unmerged_lora.py``) many adapters share one copy of the base. Either way the adapter's
id (a digest of its files) is announced, so clients never route one generation through
differently adapted blocks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.adapter_digest import adapter_id
from fedswarm.common.errors import FedswarmError

if TYPE_CHECKING:
    import torch

    from fedswarm.server.swarm.blocks import SpanModel

_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def merge_adapter(span: SpanModel, folder: Path) -> str:
    """Merge the adapter's LoRA deltas for the span's blocks into their weights; return its id."""
    import torch

    scale, pairs = read_lora(span, folder)
    with torch.no_grad():
        for (layer, module), (a, b) in sorted(pairs.items()):
            target = span.layers[layer].get_submodule(module)
            delta = (b.float() @ a.float()) * scale
            target.weight += delta.to(device=target.weight.device, dtype=target.weight.dtype)
    return adapter_id(folder)


def read_lora(span: SpanModel, folder: Path) -> tuple[float, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's scale and its ``(A, B)`` pairs for the span's blocks, keyed by (local layer, module).

    Every pair is checked against the span's weights (``A``: [r, in], ``B``: [out, r]), so an
    adapter of another model is refused here, with the block and module named.
    """
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return parse_lora(span, folder, config, load_file(str(folder / "adapter_model.safetensors")))


def parse_lora(
    span: SpanModel, folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[float, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`read_lora` of an adapter already read (``folder`` only names it in errors)."""
    _check_config(folder, config)
    sides: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            raise FedswarmError(
                f"--adapter {folder}: tensor {name!r} is outside the decoder blocks; the swarm serves block LoRA only"
            )
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if span.start <= layer < span.end:
            sides.setdefault((layer, module), {})[side] = tensor
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), found in sorted(sides.items()):
        if set(found) != {"A", "B"}:
            raise FedswarmError(f"--adapter {folder}: block {layer} {module} lacks lora_A or lora_B")
        a, b = found["A"], found["B"]
        try:
            target = span.layers[layer - span.start].get_submodule(module)
        except AttributeError:
            raise FedswarmError(f"--adapter {folder}: block {layer} has no module {module!r}") from None
        shape = (b.shape[0], a.shape[1]) if a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1] else None
        if shape is None or tuple(shape) != tuple(target.weight.shape):
            raise FedswarmError(
                f"--adapter {folder}: block {layer} {module} delta has shape {tuple(b.shape)} @ {tuple(a.shape)}, "
                f"the model's weight {tuple(target.weight.shape)} (adapter of another model?)"
            )
        pairs[(layer - span.start, module)] = (a, b)
    return _scale(config), pairs


def _check_config(folder: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise FedswarmError(f"--adapter {folder}: peft_type {config.get('peft_type')!r}, only LORA is supported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise FedswarmError(f"--adapter {folder}: {flag}=true is not supported by the swarm")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FedswarmError(f"--adapter {folder}: per-module rank_pattern/alpha_pattern are not supported")
    if config.get("modules_to_save"):
        raise FedswarmError(
            f"--adapter {folder}: modules_to_save {config['modules_to_save']} cannot be split over servers"
        )


def _scale(config: dict[str, Any]) -> float:
    rank, alpha = float(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
