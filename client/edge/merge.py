"""The adapter to export, what its run recorded, and the merged PyTorch model every check compares to."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.adapter_digest import ADAPTER_FILES
from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import DEFAULT_MODEL, ModelSpec, parse_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """Where the adapter came from: its folder (None for the base model) and the run's summary.json."""

    adapter: Path | None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.summary.get("config") or {})

    @property
    def privacy(self) -> dict[str, Any] | None:
        """``{"epsilon": ..., "delta": ..., ...}`` where the run trained under DP, else None.

        A run's summary.json has ``{"local": {...}, "central": {...}}`` (local DP's worst node,
        central DP's clipped mean); a flat ``{"epsilon", "delta"}`` is read as it is.
        """
        value = self.summary.get("privacy")
        if not isinstance(value, dict):
            return None
        local, central = value.get("local"), value.get("central")
        if isinstance(local, dict):
            out = {"epsilon": local.get("epsilon_max"), "delta": local.get("delta"), "kind": "local, per node"}
            out.update({k: local[k] for k in ("accountant", "noise_multiplier", "max_grad_norm") if k in local})
            return out
        if isinstance(central, dict):
            return {"epsilon": central.get("epsilon"), "delta": central.get("delta"), "kind": "central, per client"}
        return dict(value)

    @property
    def privacy_nodes(self) -> dict[str, dict[str, Any]]:
        """Local DP: each node's figures (accountant, delta, clipping bound, (sigma, q, steps) history, epsilon)."""
        local = (self.summary.get("privacy") or {}).get("local") or {}
        nodes = local.get("nodes") if isinstance(local, dict) else None
        return dict(nodes) if isinstance(nodes, dict) else {}


def resolve_adapter(value: str) -> RunInfo:
    """Validate ``--adapter`` (a run's ``adapter/`` folder or ``none``) and read the run's summary."""
    if value.strip().lower() == "none":
        return RunInfo(None)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FedswarmError(
            f"--adapter {value!r}: no such folder; expected a run's adapter/ folder "
            f"({' + '.join(ADAPTER_FILES)}) or 'none' for the base model"
        )
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise FedswarmError(f"--adapter {value!r}: not a PEFT adapter folder, {', '.join(missing)} missing")
    summary_file = path.parent / "summary.json"
    summary: dict[str, Any] = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            log.warning("Ignoring unreadable %s (%s)", summary_file, exc)
    return RunInfo(path, summary)


def resolve_model(value: str | None, run: RunInfo) -> ModelSpec:
    """``--model`` if given, else the run's own model, else the default one."""
    return parse_model(value or str(run.config.get("model") or DEFAULT_MODEL))


def merged_model(spec: ModelSpec, run: RunInfo) -> PreTrainedModel:
    """The base model with the adapter folded into its weights (W + B·A·alpha/r), float32, eval mode.

    Merging before export gives plain Linear layers: every ONNX runtime and quantiser
    handles them, and inference pays nothing for the adapter.
    """
    from fedswarm.common.model import load_model

    model = load_model(spec)
    if run.adapter is None:
        return model
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(run.adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedswarmError(
            f"--adapter {run.adapter}: does not fit the {spec.name} model ({first}); pass the run's --model"
        ) from exc
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged
