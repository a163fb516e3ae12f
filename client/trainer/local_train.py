"""Local LoRA training: a fixed number of AdamW steps on the node's own examples."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedswarm.common.batches import (
    TRAIN_PAD_MULTIPLE,
    Encoded,
    answer_loss,
    answer_tokens,
    collate,
    encode,
    padded_width,
    to_device,
)
from fedswarm.common.data import Example
from fedswarm.common.device import autocast_for
from fedswarm.common.errors import FedswarmError, InputError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


log = logging.getLogger(__name__)

# A step's batch runs forward and backward in micro-batches of at most this many (padded) tokens,
# its gradients accumulating: the activations kept for backward scale with the micro-batch, not
# the batch (default model, batch 8 of ~60-token rows: peak 1.92 -> 1.70 GB per process at ~7% more time).
MICRO_BATCH_TOKENS = 256
# Suffixes after a shared prefix are short (sarcasm: 16-28 tokens), so 64-token padding would
# double them; widths rounded to 8 keep the number of distinct batch shapes (heap growth) bounded.
SUFFIX_PAD_MULTIPLE = 8


def micro_batches(
    rows: Sequence[Encoded], max_tokens: int = MICRO_BATCH_TOKENS, multiple: int = 1
) -> list[Sequence[Encoded]]:
    """``rows`` in order, cut into runs whose padded size (rows x the longest row, rounded up to a
    multiple of ``multiple`` as ``collate`` pads it) stays within ``max_tokens``."""
    out: list[Sequence[Encoded]] = []
    start, longest = 0, 0
    for i, row in enumerate(rows):
        wider = max(longest, padded_width(len(row.input_ids), multiple))
        if i > start and wider * (i + 1 - start) > max_tokens:
            out.append(rows[start:i])
            start, wider = i, padded_width(len(row.input_ids), multiple)
        longest = wider
    out.append(rows[start:])
    return out


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the steps (nats per answer token)
    steps: int
    seconds: float


def train_lora(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_seq_len: int,
    seed: int,
    precision: str = "auto",
    on_grads: Callable[[], None] | None = None,
    balance: bool = False,
    share_prefix: bool = True,
) -> TrainResult:
    """Train the adapter for ``steps`` steps on batches drawn (seeded) from ``examples``.

    ``on_grads`` runs at every step once the (unscaled) gradients are in place, before the
    optimizer reads them (SCAFFOLD's correction, ``drift.py``; FedProx's proximal term).
    ``balance``: label-balanced batches (``draw_order``). ``share_prefix``: the prompt prefix
    a step's rows share runs once (``_forward_backward``; the same loss and gradient).
    """
    import torch

    if not examples:
        raise InputError("no training examples on this node")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable (LoRA) parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    order = draw_order(examples, steps * batch_size, seed, balance)
    pad = int(tokenizer.pad_token_id)
    device = params[0].device
    cast, scaler = autocast_for(device.type, precision)
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(steps):
        pick = np.take(order, range(step * batch_size, (step + 1) * batch_size), mode="wrap")
        rows = [encode(tokenizer, examples[i], max_seq_len) for i in pick]
        value = _forward_backward(model, rows, pad, device, cast, scaler, share_prefix)
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        if scaler is not None:
            if on_grads is not None:
                scaler.unscale_(optimizer)
                on_grads()
            scaler.step(optimizer)
            scaler.update()
        else:
            if on_grads is not None:
                on_grads()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
    model.eval()
    return TrainResult(float(np.mean(losses)), steps, time.perf_counter() - started)


def _forward_backward(
    model: PeftModel,
    rows: Sequence[Encoded],
    pad: int,
    device: torch.device,
    cast: AbstractContextManager[Any],
    scaler: torch.amp.GradScaler | None,
    share_prefix: bool = True,
) -> float:
    """One step's loss (the mean over its answer tokens), its gradients accumulated on the adapter.

    With ``share_prefix``, the prompt prefix every row shares (a repeated system prompt) runs
    once; the rows' suffixes, sorted by length so that a micro-batch holds rows of about one
    width, run against its keys and values, and their gradients go back through it once.
    Without a shared prefix, whole rows run padded to ``TRAIN_PAD_MULTIPLE``.
    """
    from fedswarm.common.prefix import PrefixCache, shared_prefix_len, suffixes

    cut = shared_prefix_len(rows) if share_prefix else 0
    with cast:  # forward passes under autocast, backward passes outside it (as torch.amp asks)
        prefix = PrefixCache.compute(model, rows[0].input_ids[:cut], trainable=True) if cut else None
    if prefix is not None:
        rows = sorted(suffixes(rows, cut), key=lambda r: len(r.input_ids))
    multiple = SUFFIX_PAD_MULTIPLE if prefix is not None else TRAIN_PAD_MULTIPLE
    chunks = micro_batches(rows, MICRO_BATCH_TOKENS, multiple)
    parts = [to_device(collate(part, pad, multiple), device) for part in chunks]
    total = sum(answer_tokens(part) for part in parts)  # the step's loss: the mean over all of them
    value = 0.0
    for part in parts:
        with cast:
            loss = answer_loss(model, part, total, prefix)
        value += float(loss.detach())
        (scaler.scale(loss) if scaler is not None else loss).backward()  # scaler: fp16 without bf16
        del loss
    if prefix is not None:
        prefix.backward()  # the suffixes' gradients on the prefix's keys and values, through its one pass
    return value


def draw_order(examples: Sequence[Example], count: int, seed: int, balance: bool = False) -> np.ndarray:
    """Indices of the examples the steps take, in turn (cycled when fewer than ``count``): a seeded permutation.

    ``balance``: slot j takes the next example (in that permutation) of the j-th label in
    turn, so every label is drawn equally often, a rare one's examples repeating when they
    run out. Under label skew each node's expected gradient is then that of the balanced
    objective, which is the same on every node when only the label mix differs between them.
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    if not balance:
        return order
    by_label: dict[str, list[int]] = {}
    for i in order.tolist():
        label = examples[i].label
        if label is None:
            raise FedswarmError("--balance-labels needs labelled examples; this node's data has unlabelled ones")
        by_label.setdefault(label, []).append(i)
    pools = [by_label[label] for label in sorted(by_label)]
    if len(pools) == 1:
        log.warning("--balance-labels: this node holds one label only, so its batches cannot be balanced")
    n = len(pools)  # slot j: label j % n, that label's (j // n)-th draw
    return np.array([pools[j % n][(j // n) % len(pools[j % n])] for j in range(count)])
