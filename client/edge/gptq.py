"""GPTQ: weight-only quantisation that corrects each rounding on the weights not yet rounded.

Round-to-nearest rounds every weight on its own; GPTQ (Frantar et al., 2023) rounds one
input column at a time and moves the error it made onto the remaining columns, weighted
by the inverse Hessian of the layer's inputs, H = 2·XᵀX over calibration text. The result
minimises the error of the layer's *outputs* on text like the calibration text, not the
error of its weights: what keeps a 4-bit model's greedy choices where the merged model's
are, adapter included (a weight-space method such as HQQ pulls the small adapter delta
back to the base model's grid).

Layers are quantised in order, each calibrated on the outputs of the already-quantised
layers before it (the errors a deployed model really sees). Codes and scales come out in
the layout MatMulNBits reads: symmetric per block along the input dimension, codes in
[-2^(bits-1), 2^(bits-1) - 1], each block's scale the clipped max|w| / (2^(bits-1) - 1)
with the least rounding error.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedswarm.client.edge.quantize import SMALLEST_HALF

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DAMP = 0.01  # added to H's diagonal, relative to its mean: keeps the Cholesky stable on little text
LAZY = 128  # columns updated together (the reference implementation's lazy batch)
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(13))  # block scale candidates: max|w| x 1.0 .. 0.7


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear layer's weight [out, in] as integer codes and per-block scales."""

    codes: np.ndarray  # int8 [out, in], in [-2^(bits-1), 2^(bits-1) - 1]
    scales: np.ndarray  # float32 [out, in // block], each exactly a float16 (the file stores them as such)
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        out, cols = self.codes.shape
        blocks = self.codes.reshape(out, cols // self.block, self.block).astype(np.float32)
        return (blocks * self.scales[..., None]).reshape(out, cols)


# (module name, weight shape [out, in]) -> (bits, block) for layers to quantise, None to leave alone
Plan = Callable[[str, tuple[int, ...]], "tuple[int, int] | None"]


def gptq_linear(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, block: int, damp: float = DAMP
) -> QuantizedLinear:
    """Quantise ``weight`` [out, in] given the Hessian [in, in] of its inputs; ``in`` must divide into blocks."""
    import torch

    rows, cols = weight.shape
    if cols % block:
        raise ValueError(f"{cols} input columns do not divide into blocks of {block}")
    lazy = max(block, LAZY // block * block)
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    scales = torch.zeros(rows, cols // block, dtype=torch.float64)
    for start in range(0, cols, lazy):
        end = min(start + lazy, cols)
        chunk = w[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        hchunk = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % block == 0:  # the block's scale from its weights as updated so far
                scales[:, col // block] = _block_scale(chunk[:, i : i + block], qmax)
            scale = scales[:, col // block]
            q = torch.clamp(torch.round(chunk[:, i] / scale), -qmax - 1, qmax)
            codes[:, col] = q.to(torch.int8)
            err = (chunk[:, i] - q * scale) / hchunk[i, i]
            chunk[:, i:] -= err[:, None] * hchunk[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return QuantizedLinear(codes.numpy(), scales.to(torch.float32).numpy(), bits, block)


def _block_scale(weights: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row, the scale (max|w|·c/qmax, c from CLIP_GRID) whose rounding error on ``weights`` is least.

    Clipping the few largest weights buys a finer step for all the others: at 4 bits the
    best c is often 0.8-0.9 (the search GPTQ's and AWQ's reference quantisers also run).
    """
    import torch

    top = weights.abs().amax(dim=1)
    top = torch.where(top > 0, top, torch.ones_like(top))
    best_scale, best_err = half_exact(top / qmax), None
    for c in CLIP_GRID:
        scale = half_exact(top * c / qmax)
        q = torch.clamp(torch.round(weights / scale[:, None]), -qmax - 1, qmax)
        err = (weights - q * scale[:, None]).pow(2).sum(dim=1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


def half_exact(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest float16 (never to zero): the value the exported file stores.

    Codes are then chosen against the scale the model will really use, so storing the
    scales in half precision (half the bytes of the scales, ~3% of an 8-bit model) costs nothing.
    """
    import torch

    return scale.clamp(min=SMALLEST_HALF).to(torch.float16).to(scale.dtype)


def gptq_model(model: PreTrainedModel, texts: Sequence[Sequence[int]], plan: Plan) -> dict[str, QuantizedLinear]:
    """GPTQ every linear layer of ``model``'s decoder blocks, and its output head, that ``plan`` picks.

    ``model`` is left untouched.
    Each block runs once on the cached inputs to collect its Hessians, is quantised, and runs
    again (quantised) to give the next block its inputs: about two forward passes in all.
    Returns module name (as in ``model.named_modules()``) -> codes and scales.
    """
    import torch

    work = copy.deepcopy(model).eval()
    blocks = _decoder_blocks(work)
    names = {id(module): name for name, module in work.named_modules()}
    calls = _first_block_calls(work, blocks[0], texts)
    result: dict[str, QuantizedLinear] = {}
    t0 = time.perf_counter()
    for index, block in enumerate(blocks):
        chosen = {
            names[id(m)]: (m, choice)
            for m in block.modules()
            if isinstance(m, torch.nn.Linear) and (choice := plan(names[id(m)], tuple(m.weight.shape))) is not None
        }
        if chosen:
            hessians = _hessians(block, [m for m, _ in chosen.values()], calls)
            for name, (module, (bits, block_size)) in chosen.items():
                quantized = gptq_linear(module.weight, hessians[id(module)], bits, block_size)
                module.weight.data = torch.from_numpy(quantized.dequantize()).to(module.weight.dtype)
                result[name] = quantized
        with torch.no_grad():  # the next block's inputs, through this block as quantised
            calls = [((_hidden(block(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in calls]
        log.info("GPTQ: block %d/%d done (%.0f s)", index + 1, len(blocks), time.perf_counter() - t0)
    head = work.get_output_embeddings()
    choice = plan(names[id(head)], tuple(head.weight.shape)) if isinstance(head, torch.nn.Linear) else None
    if choice is not None:  # the head reads the final norm of the last block's output: its logits are what count
        norm = _final_norm(work)
        hessian = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
        tokens = 0
        with torch.no_grad():
            for args, _ in calls:
                x = norm(args[0]).reshape(-1, head.in_features).to(torch.float64)
                hessian.addmm_(x.T, x)
                tokens += x.shape[0]
        result[names[id(head)]] = gptq_linear(head.weight, hessian * (2.0 / max(1, tokens)), *choice)
        log.info("GPTQ: output head done (%.0f s)", time.perf_counter() - t0)
    return result


def _final_norm(model: PreTrainedModel) -> torch.nn.Module:
    """The norm between the last block and the head (``model.model.norm`` for Llama-like models)."""
    import torch

    norm = getattr(getattr(model, "model", None), "norm", None)
    return norm if isinstance(norm, torch.nn.Module) else torch.nn.Identity()


class _Stop(Exception):
    """Raised once the first block's inputs are captured: nothing later is needed."""


Call = tuple[tuple, dict]


def _first_block_calls(model: PreTrainedModel, block: torch.nn.Module, texts: Sequence[Sequence[int]]) -> list[Call]:
    """The (args, kwargs) the first decoder block is called with, one per text (hidden states, rotary, mask)."""
    import torch

    calls: list[Call] = []

    def capture(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if not args:  # hidden states passed by name
            args = (kwargs.pop("hidden_states"),)
        calls.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in texts:
                try:
                    model(torch.tensor([list(ids)]), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return calls


def _hessians(block: torch.nn.Module, linears: list[torch.nn.Linear], calls: list[Call]) -> dict[int, torch.Tensor]:
    """H = 2/n Σ x xᵀ of each linear's inputs over every token of the cached block calls."""
    import torch

    sums = {id(m): torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in linears}
    counts = dict.fromkeys(sums, 0)

    def collect(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().reshape(-1, module.in_features).to(torch.float64)
        sums[id(module)].addmm_(x.T, x)
        counts[id(module)] += x.shape[0]

    handles = [m.register_forward_pre_hook(collect) for m in linears]
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {key: value * (2.0 / max(1, counts[key])) for key, value in sums.items()}


def _hidden(output: object) -> torch.Tensor:
    """A decoder block's hidden-states output (a tensor, or the first item of a tuple in older transformers)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _decoder_blocks(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The decoder's repeated blocks (``model.model.layers`` for Llama-like models)."""
    import torch

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found for GPTQ")
    return list(max(lists, key=lambda m: len(list(m))))
