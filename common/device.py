"""Choosing where tensors live: ``--device auto|cpu|cuda`` and ``--quantize-base 4bit``."""

from __future__ import annotations

import contextlib
from typing import Any

from fedswarm.common.errors import FedswarmError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(value: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is usable, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if value not in DEVICES:
        raise FedswarmError(f"--device {value!r}: expected one of {', '.join(DEVICES)}")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise FedswarmError(f"--device cuda: no CUDA GPU is usable here (torch {torch.__version__}); use --device cpu")
    return value


def check_quantize_base(value: str, device: str) -> None:
    """``4bit`` (QLoRA: frozen base in NF4 via bitsandbytes) needs CUDA and bitsandbytes."""
    if value in ("", "none"):
        return
    if value != "4bit":
        raise FedswarmError(f"--quantize-base {value!r}: expected 4bit or none")
    if device != "cuda":
        raise FedswarmError("--quantize-base 4bit needs a CUDA GPU (bitsandbytes QLoRA); this machine has none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise FedswarmError("--quantize-base 4bit needs bitsandbytes: pip install bitsandbytes") from exc


def quantization_config(value: str) -> Any:
    """transformers' 4-bit config for the frozen base (NF4, bf16 compute), or None."""
    if value != "4bit":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def autocast_for(device: str, precision: str) -> tuple[contextlib.AbstractContextManager[None], Any]:
    """(autocast context, gradient scaler or None) for training on ``device``.

    CUDA: bf16 where the card supports it, else fp16 with a GradScaler. CPU: bf16 only
    where the CPU computes it natively (see ``resolve_precision``), else fp32.
    """
    import torch

    if device == "cuda" and precision != "fp32":
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16), None
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if resolve_precision(precision) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return contextlib.nullcontext(), None


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where the CPU computes it natively (AVX512-BF16/AMX), else fp32.

    Without native support bf16 autocast is emulated: ~4x slower than fp32 (measured on
    an AVX512 CPU without BF16).
    """
    import torch

    if precision != "auto":
        return precision
    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return "bf16" if native and _cpu_has_native_bf16() else "fp32"


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
