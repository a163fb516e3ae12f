"""Every exported variant against the merged PyTorch model, on held-out text.

Each text runs through the ONNX graph the way an app uses it: a prefill of all but the
last few tokens, then teacher-forced one-token decode steps through the KV cache, so
both graph paths are checked. Figures per variant: greedy next-token agreement with
PyTorch, max and mean absolute logit error, and perplexity of the text. A context that
several texts share (the chat template and system prompt they all start with) is one
prediction, compared once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedswarm.client.edge.merge import RunInfo
from fedswarm.client.edge.runtime import OrtCausalLM
from fedswarm.client.edge.variants import min_agreement

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DECODE_STEPS = 8  # last tokens of each text fed one at a time through the cache


@dataclass(frozen=True)
class VariantParity:
    variant: str
    file: str
    size_bytes: int
    size_vs_fp32: float
    next_token_agreement: float  # share of positions where argmax(onnx) == argmax(pytorch)
    max_logit_error: float
    mean_logit_error: float
    perplexity: float
    perplexity_change: float  # relative to PyTorch's perplexity on the same tokens
    min_agreement: float
    passed: bool


@dataclass(frozen=True)
class Parity:
    variants: list[VariantParity]
    reference_perplexity: float  # the merged PyTorch model's, on the same tokens
    texts: int
    positions: int  # distinct next-token predictions compared per variant (a shared context counted once)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def failures(self) -> list[str]:
        return [
            f"{v.variant} next-token agreement {v.next_token_agreement:.3f} < {v.min_agreement}"
            for v in self.variants
            if not v.passed
        ]

    def to_json(self) -> dict[str, Any]:
        """The content of parity.json."""
        return {
            "reference": "merged PyTorch model, float32",
            "reference_perplexity": self.reference_perplexity,
            "texts": self.texts,
            "positions": self.positions,
            "decode_steps_per_text": DECODE_STEPS,
            "passed": self.passed,
            "variants": {v.variant: asdict(v) for v in self.variants},
        }


def held_out_texts(tokenizer: PreTrainedTokenizerBase, run: RunInfo, samples: int, max_len: int) -> list[list[int]]:
    """Token ids of held-out examples (prompt + answer), from the run's own data and held-out split.

    The split is the one the federation never trained on, so quantisation error is measured
    where the adapter generalises, not where it memorised.
    """
    return _run_texts(tokenizer, run, samples, max_len, held_out=True)


def training_texts(tokenizer: PreTrainedTokenizerBase, run: RunInfo, samples: int, max_len: int) -> list[list[int]]:
    """Token ids of training examples of the run's data: calibration text that never overlaps the parity texts."""
    return _run_texts(tokenizer, run, samples, max_len, held_out=False)


def _run_texts(
    tokenizer: PreTrainedTokenizerBase, run: RunInfo, samples: int, max_len: int, held_out: bool
) -> list[list[int]]:
    from fedswarm.common.batches import encode
    from fedswarm.common.splits import run_records_of

    records, split = run_records_of(run.config)
    picked = (split.holdout if held_out else split.train)[:samples]
    return [list(encode(tokenizer, records[int(i)], max_len).input_ids) for i in picked]


def check_variants(
    model: PreTrainedModel,
    files: dict[str, Path],
    texts: list[list[int]],
    quantised_floor: float,
    threads: int = 0,
) -> Parity:
    """Compare each ONNX file in ``files`` (variant -> path, fp32 included) with ``model`` on ``texts``."""
    import torch

    sessions = {variant: OrtCausalLM(path, threads) for variant, path in files.items()}
    stats = {variant: _Stats() for variant in files}
    ref_nll: list[float] = []
    for index, ids in enumerate(texts):
        start = _first_new_position(ids, texts[:index])
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        ref_nll.extend(_nll(ref, ids)[start:])
        for variant, session in sessions.items():
            stats[variant].add(ref, _run_text(session, ids), ids, start)
    ref_ppl = math.exp(float(np.mean(ref_nll)))
    fp32_size = files["fp32"].stat().st_size
    results = []
    for variant, path in files.items():
        s = stats[variant]
        ppl = math.exp(float(np.mean(s.nll)))
        agreement = s.agree / max(1, s.positions)
        floor = min_agreement(variant, quantised_floor)
        results.append(
            VariantParity(
                variant=variant,
                file=f"onnx/{path.name}",
                size_bytes=path.stat().st_size,
                size_vs_fp32=path.stat().st_size / fp32_size,
                next_token_agreement=agreement,
                max_logit_error=s.max_err,
                mean_logit_error=s.abs_sum / max(1, s.count),
                perplexity=ppl,
                perplexity_change=ppl / ref_ppl - 1.0,
                min_agreement=floor,
                passed=agreement >= floor,
            )
        )
    return Parity(results, ref_ppl, len(texts), stats["fp32"].positions)


def _first_new_position(ids: list[int], earlier: list[list[int]]) -> int:
    """The first position whose context ``ids[:p + 1]`` no earlier text shares.

    Every chat-rendered text starts with the same template and system prompt (31 of
    ~55 tokens for the sarcasm data): those predictions are the same ones each time, and
    counting them once per text would weigh one near-tie there as many times as there are texts.
    """
    start = 0
    for other in earlier:
        n = min(len(ids), len(other))
        same = next((i for i in range(n) if ids[i] != other[i]), n)
        start = max(start, same)
    return start


def _run_text(session: OrtCausalLM, ids: list[int]) -> np.ndarray:
    session.reset()
    split = max(1, len(ids) - DECODE_STEPS)
    parts = [session.forward(ids[:split])]
    parts.extend(session.forward([token]) for token in ids[split:])
    return np.concatenate(parts, axis=0)


def _nll(logits: np.ndarray, ids: list[int]) -> list[float]:
    """Negative log-likelihood of each next token (positions 0..n-2 predict ids 1..n-1)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=1))
    return list(logz - x[np.arange(len(ids) - 1), ids[1:]])


class _Stats:
    def __init__(self) -> None:
        self.agree = self.positions = self.count = 0
        self.max_err = self.abs_sum = 0.0
        self.nll: list[float] = []

    def add(self, ref: np.ndarray, got: np.ndarray, ids: list[int], start: int = 0) -> None:
        """Positions ``start`` .. len-2 (those predicting ids[start + 1:]); logit errors from ``start`` on."""
        if start >= len(ids):
            return
        err = np.abs(got[start:] - ref[start:])
        self.max_err = max(self.max_err, float(err.max()))
        self.abs_sum += float(err.sum(dtype=np.float64))
        self.count += err.size
        self.agree += int((got[start:-1].argmax(axis=1) == ref[start:-1].argmax(axis=1)).sum())
        self.positions += max(0, len(ids) - 1 - start)
        self.nll.extend(_nll(got, ids)[start:])
