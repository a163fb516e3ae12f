"""A minimal onnxruntime driver for optimum's decoder graph: prefill, cached decode, greedy.

optimum's ``ORTModelForCausalLM`` does this too, but hides the per-step logits and
session options that parity checks and latency benchmarks need; this is the loop
transformers.js runs in the browser, written out (feeds by name, KV cache in, present out).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtCausalLM:
    """One onnxruntime session over an exported decoder, with its own KV cache."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        """Forget the cache: the next call is a prefill."""
        self._past: dict[str, np.ndarray] = {}
        for inp in self._past_inputs:
            heads, dim = inp.shape[1], inp.shape[3]
            self._past[inp.name] = np.zeros((1, heads, 0, dim), dtype=_NP_TYPES.get(inp.type, np.float32))
        self.length = 0

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (float32, [len(ids), vocab]) for ``ids`` appended after the cached tokens."""
        n = len(ids)
        total = self.length + n
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **self._past,
        }
        if "position_ids" in self._input_names:
            feeds["position_ids"] = np.arange(self.length, total, dtype=np.int64)[None]
        values = self.session.run(self._outputs, feeds)
        named = dict(zip(self._outputs, values, strict=True))
        for name in self._past:
            self._past[name] = named[name.replace("past_key_values.", "present.")]
        self.length = total
        return np.asarray(named["logits"][0], dtype=np.float32)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``prompt`` (new tokens only), stopping after ``eos_token_id``."""
        self.reset()
        logits = self.forward(list(prompt))
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[-1]))
            out.append(token)
            if token == eos_token_id:
                break
            logits = self.forward([token])
        return out
