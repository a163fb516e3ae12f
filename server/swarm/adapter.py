"""Merging a PEFT LoRA adapter into a span's blocks: ``W += (alpha / r) · B @ A``.

A server applies only the adapter tensors of the blocks it hosts, once, at load time; the
merged blocks then cost nothing extra per token. The adapter's id (a digest of its files)
is announced, so clients never route one generation through differently adapted blocks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.adapter_files import adapter_id
from fedswarm.common.errors import FedswarmError

if TYPE_CHECKING:
    from fedswarm.server.swarm.blocks import SpanModel

_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def merge_adapter(span: SpanModel, folder: Path) -> str:
    """Merge the adapter's LoRA deltas for the span's blocks into their weights; return its id."""
    import torch
    from safetensors.torch import load_file

    config = _lora_config(folder)
    scale = _scale(config)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            raise FedswarmError(
                f"--adapter {folder}: tensor {name!r} is outside the decoder blocks; the swarm merges block LoRA only"
            )
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if span.start <= layer < span.end:
            pairs.setdefault((layer, module), {})[side] = tensor
    with torch.no_grad():
        for (layer, module), sides in sorted(pairs.items()):
            if set(sides) != {"A", "B"}:
                raise FedswarmError(f"--adapter {folder}: block {layer} {module} lacks lora_A or lora_B")
            target = span.layers[layer - span.start].get_submodule(module)
            delta = (sides["B"].float() @ sides["A"].float()) * scale
            if tuple(delta.shape) != tuple(target.weight.shape):
                raise FedswarmError(
                    f"--adapter {folder}: block {layer} {module} delta has shape {tuple(delta.shape)}, "
                    f"the model's weight {tuple(target.weight.shape)} (adapter of another model?)"
                )
            target.weight += delta.to(device=target.weight.device, dtype=target.weight.dtype)
    return adapter_id(folder)


def _lora_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise FedswarmError(f"--adapter {folder}: peft_type {config.get('peft_type')!r}, only LORA can be merged")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise FedswarmError(f"--adapter {folder}: {flag}=true is not supported by the swarm")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise FedswarmError(f"--adapter {folder}: per-module rank_pattern/alpha_pattern are not supported")
    if config.get("modules_to_save"):
        raise FedswarmError(
            f"--adapter {folder}: modules_to_save {config['modules_to_save']} cannot be split over servers"
        )
    return config


def _scale(config: dict[str, Any]) -> float:
    rank, alpha = float(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
