"""Base-model loading: ``smollm2-135m`` (default), ``tiny`` (seeded random Llama), or a folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.errors import FedswarmError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
NAMED_MODELS = ("smollm2-135m", "tiny")
TINY_SEED = 1234


@dataclass(frozen=True)
class ModelSpec:
    """A validated ``--model`` value: a named model or a local HF folder."""

    name: str  # "smollm2-135m", "tiny" or "path"
    path: Path | None = None

    @property
    def model_id(self) -> str:
        """A stable identifier, used to check that swarm servers and clients agree."""
        return str(self.path.resolve()) if self.path is not None else self.name


def parse_model(value: str) -> ModelSpec:
    """Validate a ``--model`` value, raising a one-line error naming the accepted values."""
    if value in NAMED_MODELS:
        return ModelSpec(value)
    path = Path(value).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSpec("path", path)
    reason = "no such folder" if not path.exists() else "no config.json in it"
    raise FedswarmError(
        f"--model {value!r}: {reason}; expected one of {', '.join(NAMED_MODELS)} "
        "or a local Hugging Face causal-LM folder"
    )


def tiny_config(vocab_size: int = 49152) -> Any:
    """The ``tiny`` model: a 4-block Llama with SmolLM2's tokenizer and rope settings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # large enough that LoRA can move the tied-head logits in a few steps
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def load_tokenizer(spec: ModelSpec | str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (``tiny`` uses SmolLM2's)."""
    from transformers import AutoTokenizer

    spec = parse_model(spec) if isinstance(spec, str) else spec
    folder = spec.path if spec.path is not None else _smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    spec: ModelSpec | str, dtype: torch.dtype | None = None, device: str = "cpu", quantize: str = ""
) -> PreTrainedModel:
    """Load the base causal LM in eval mode on ``device`` (float32 unless ``dtype`` says otherwise).

    ``quantize="4bit"`` loads the frozen weights in NF4 (QLoRA; CUDA only, checked by
    ``fedswarm.common.device.check_quantize_base``).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from fedswarm.common.device import quantization_config

    spec = parse_model(spec) if isinstance(spec, str) else spec
    dtype = dtype or torch.float32
    model: Any  # transformers' own annotations of ``to`` and ``from_pretrained`` do not type-check
    if spec.name == "tiny" and not quantize:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = LlamaForCausalLM(tiny_config())
        model = model.to(dtype=dtype, device=device)
    else:
        folder = spec.path if spec.path is not None else _smollm2()
        extra = {"quantization_config": quantization_config(quantize), "device_map": {"": device}} if quantize else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise FedswarmError(f"--model {folder}: cannot load a causal LM from it ({exc})") from exc
        if not quantize:
            model = model.to(device)
    model.eval()
    return model


def _smollm2() -> Path:
    from fedswarm.common.gguf_convert import smollm2_folder

    return smollm2_folder()


def model_folder(spec: ModelSpec) -> Path:
    """The HF folder behind a spec (the cached conversion for the default model)."""
    return spec.path if spec.path is not None else _smollm2()
