"""A PEFT LoRA folder's identity, shared by the swarm's servers (announcing it) and clients (choosing it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedswarm.common.errors import FedswarmError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_id(folder: Path) -> str:
    """A short digest of the adapter's config and weights: equal ids mean identical adapters."""
    return digest_of([(folder / name).read_bytes() for name in ADAPTER_FILES])


def digest_of(contents: list[bytes]) -> str:
    """:func:`adapter_id` of files already read (in ``ADAPTER_FILES`` order), so a reader that
    parses the same bytes it digests cannot announce one version and serve another."""
    digest = hashlib.sha256()
    for content in contents:
        digest.update(content)
    return digest.hexdigest()[:16]


def check_adapter_folder(value: str) -> Path:
    """Validate ``--adapter DIR``: a PEFT LoRA folder (e.g. a federated run's ``adapter/``)."""
    folder = Path(value).expanduser()
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise FedswarmError(f"--adapter {value!r}: not a PEFT adapter folder (missing {', '.join(missing)})")
    return folder
