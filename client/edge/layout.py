"""The folder transformers.js and optimum read: configs and tokenizer at the top, models under onnx/.

Traps found by loading it in transformers.js: the models must sit under ``onnx/``; without
``tokenizer_config.json`` the tokenizer is silently null; the chat template must be inlined
there (``chat_template.jinja``, which transformers >= 4.47 writes instead, is not read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.client.edge.variants import JS_DTYPES
from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_model_files(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """config.json (+ transformers.js' own section), generation_config.json and the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # one file per variant, no external data; fp16 I/O was kept float32, so the KV cache is float32 too
    config["transformers.js_config"] = {
        "use_external_data_format": False,
        "kv_cache_dtype": {dtype: "float32" for dtype in JS_DTYPES.values()},
    }
    _write_json(config_file, config)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    write_tokenizer(folder, tokenizer)


def write_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Tokenizer files with the chat template inlined into tokenizer_config.json."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise InputError("the tokenizer has no chat template; the web page needs one to chat")
    tokenizer.save_pretrained(folder)
    for extra in ("chat_template.jinja", "chat_template.json"):
        (folder / extra).unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = template
    _write_json(config_file, config)
    missing = [name for name in ("tokenizer.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"the tokenizer did not write {', '.join(missing)} (a fast tokenizer is required)")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
