"""fp32 ONNX with a KV cache, through optimum (task ``text-generation-with-past``).

optimum's graph (input_ids, attention_mask, position_ids, past_key_values.N.* -> logits,
present.N.*) is what transformers.js and optimum's ``ORTModelForCausalLM`` both load, so
the export is taken as it comes; only the file location changes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
MAX_SINGLE_FILE = 2 * 1024**3  # protobuf's limit; transformers.js loads one file without external data


def export_fp32(model: PreTrainedModel, target: Path) -> Path:
    """Export ``model`` to ``target`` (one .onnx file) and return it.

    optimum's own validation is skipped: :mod:`fedswarm.client.edge.parity` checks every
    variant against the same PyTorch model on real text, which is the stricter test.
    """
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnx-export-", dir=target.parent) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings from the model code, expected under export
            onnx_export_from_model(model, output=tmp, task=TASK, do_validation=False, device="cpu")
        produced = Path(tmp) / "model.onnx"
        if not produced.is_file():
            raise RuntimeError(f"optimum produced no model.onnx (got {sorted(p.name for p in Path(tmp).iterdir())})")
        extra = [p.name for p in Path(tmp).iterdir() if p.name.startswith("model.onnx") and p != produced]
        if extra or produced.stat().st_size > MAX_SINGLE_FILE:
            raise RuntimeError("the model is too large for a single ONNX file (external data is not supported here)")
        shutil.move(str(produced), target)
    log.info("Exported fp32 ONNX: %s (%.1f MB)", target.name, target.stat().st_size / 1e6)
    return target
