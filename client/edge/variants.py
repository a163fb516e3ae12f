"""The exported variants, their file names in the transformers.js layout, and ``--quant`` parsing.

Kept free of heavy imports: the CLI validates ``--quant`` before torch or onnxruntime load.
"""

from __future__ import annotations

from fedswarm.common.errors import FedswarmError

# variant -> file under EDGE_DIR/onnx/, named as transformers.js' ``dtype`` option looks for it
FILES = {
    "fp32": "model.onnx",
    "int8": "model_quantized.onnx",
    "q4": "model_q4.onnx",
    "q4f16": "model_q4f16.onnx",
}
# variant -> the ``dtype`` to pass to transformers.js (it maps "q8" to model_quantized.onnx)
JS_DTYPES = {"fp32": "fp32", "int8": "q8", "q4": "q4", "q4f16": "q4f16"}
DEFAULT_QUANT = ("fp32", "int8", "q4", "q4f16")
FP32_MIN_AGREEMENT = 0.999
QUANT_MIN_AGREEMENT = 0.9


def parse_quant(value: str) -> tuple[str, ...]:
    """``"fp32,int8"`` -> ("fp32", "int8"); fp32 is always included (the others derive from it)."""
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in FILES]
    if unknown or not names:
        shown = ", ".join(repr(n) for n in unknown) or repr(value)
        raise FedswarmError(
            f"--quant {shown}: unknown variant; expected a comma-separated subset of {', '.join(FILES)}"
        )
    chosen = set(names) | {"fp32"}
    return tuple(name for name in FILES if name in chosen)


def min_agreement(variant: str, quantised_floor: float) -> float:
    """The agreement a variant must reach: fp32 is held to near-identity, quantised ones to the flag."""
    return FP32_MIN_AGREEMENT if variant == "fp32" else quantised_floor
