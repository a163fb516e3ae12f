"""Reading only some tensors of a model folder, so a span server never holds the whole model.

safetensors files are memory-mapped by ``safe_open``: a server of blocks 10..19 reads those
blocks' tensors and nothing else, and the parts of the file it skips are never paged in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import FedswarmError

if TYPE_CHECKING:
    import torch


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FedswarmError(f"{folder}: no model.safetensors (the swarm reads safetensors weights only)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)


def read_tensors(folder: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the tensors whose names ``keep`` accepts, file by file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(folder).items():
        if keep(name):
            by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with safe_open(str(path), framework="pt") as handle:
            for name in sorted(names):
                yield name, handle.get_tensor(name)


def tensor_bytes(folder: Path, keep: Callable[[str], bool]) -> int:
    """Bytes the accepted tensors occupy, read from the headers without loading any data."""
    from safetensors import safe_open

    total = 0
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_files(folder).items():
        if keep(name):
            by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                piece = handle.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                total += count * _itemsize(piece.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(
        dtype, 4
    )
