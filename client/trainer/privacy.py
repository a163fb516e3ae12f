"""DP-SGD on the LoRA parameters with Opacus, and the node's cumulative accountant (RDP or PRV).

The accountant's history (noise multiplier, sample rate, steps) is kept in the node's
persistent state between rounds, so epsilon accumulates instead of restarting with
every new PrivacyEngine. Batches are Poisson-sampled (each example joins a step with
its own probability, at most q), which is what the analysis assumes; an empty draw still
takes a noisy step, as the analysis requires. One step's draw (the private batch) is
processed in micro-batches whose per-example gradients are clipped and summed before
the step's single noise draw (Opacus' skip-step accumulation, as in its
BatchMemoryManager), so memory is that of a micro-batch and the accountant counts steps.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedswarm.common.accounting import ACCOUNTANTS, calibrate_noise, epsilon_of
from fedswarm.common.batches import TRAIN_PAD_MULTIPLE, collate, encode, per_sample_answer_loss, to_device
from fedswarm.common.data import Example
from fedswarm.common.errors import FedswarmError

__all__ = ["ACCOUNTANTS", "Accountant", "DpSettings", "calibrate_noise", "epsilon_of", "sample_rates", "train_lora_dp"]

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float  # sigma: noise std / max_grad_norm
    max_grad_norm: float  # per-sample L2 clipping bound C
    delta: float
    budget: float  # epsilon a node may reach; 0 = no budget
    sample_rate: float  # q: the largest rate at which an example joins a step (what is accounted)
    accountant: str = "rdp"  # rdp or prv (Opacus' accountants)
    optimizer: str = "adam"  # adam (AdamW) or sgd, fed the clipped, noised mean gradient
    momentum: float = 0.0  # sgd only
    micro_batch: int = 0  # examples per forward/backward pass within one step (0: the whole draw)


@dataclass
class Accountant:
    """An Opacus accountant whose state is a plain list, so it can live in Flower's node state."""

    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)
    kind: str = "rdp"

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        history = list(self.history) + ([extra] if extra else [])
        return epsilon_of(history, delta, self.kind)

    def record(self, sigma: float, q: float, steps: int) -> None:
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def dumps(self) -> str:
        return json.dumps(self.history)

    @classmethod
    def loads(cls, text: str, kind: str = "rdp") -> Accountant:
        return cls([(float(a), float(b), int(c)) for a, b, c in json.loads(text or "[]")], kind)


BALANCE_RATE_CAP = 4.0  # balanced rates: no example joins a step more than this many times as often as uniformly


def sample_rates(examples: Sequence[Example], expected_batch: int, balance: bool = False) -> np.ndarray:
    """Each example's Poisson rate: ``expected_batch / n`` for all, or label-balanced in expectation.

    ``balance``: every label contributes ``expected_batch / labels`` examples to a step in
    expectation (rate ``expected_batch / (labels * n_label)``), but no rate exceeds
    ``BALANCE_RATE_CAP`` times the uniform one, since the accountant charges every example
    at the largest rate: a label with a handful of examples would otherwise cost the whole
    node its noise level (and those few examples would be drawn at nearly every step).
    """
    n = len(examples)
    if n == 0:
        raise ValueError("no training examples on this node")
    uniform = min(1.0, expected_batch / n)
    if not balance:
        return np.full(n, uniform)
    labels = [e.label for e in examples]
    if any(label is None for label in labels):
        raise FedswarmError("--balance-labels needs labelled examples; this node's data has unlabelled ones")
    counts: dict[str, int] = {}
    for label in labels:
        counts[str(label)] = counts.get(str(label), 0) + 1
    cap = min(1.0, BALANCE_RATE_CAP * uniform)
    per_label = {k: min(cap, expected_batch / (len(counts) * c)) for k, c in counts.items()}
    return np.array([per_label[str(label)] for label in labels])


@dataclass(frozen=True)
class DpTrainResult:
    loss: float
    steps: int
    seconds: float
    epsilon: float
    empty_batches: int


def noise_generator(seed: int | None, device: str = "cpu") -> torch.Generator:
    """A seeded generator when a seed is given (tests), else one seeded from the OS."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def train_lora_dp(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    steps: int,
    learning_rate: float,
    max_seq_len: int,
    settings: DpSettings,
    accountant: Accountant,
    seed: int,
    generator: torch.Generator,
    on_grads: Callable[[], None] | None = None,
    rates: np.ndarray | None = None,
) -> DpTrainResult:
    """``steps`` DP-SGD steps; updates ``accountant`` in place (only for steps taken).

    ``rates``: each example's Poisson rate (default: ``settings.sample_rate`` for all); the
    accountant charges ``settings.sample_rate``, which must be at least the largest of them.
    ``on_grads`` sees each step's clipped, noised gradients before the optimizer does
    (Opacus' step hook).
    """
    import torch

    rates = np.full(len(examples), settings.sample_rate) if rates is None else np.asarray(rates, dtype=float)
    if len(rates) != len(examples) or (len(rates) and rates.max() > settings.sample_rate * (1 + 1e-12)):
        raise ValueError("per-example rates must match the examples and stay within the accounted sample rate")
    params = [p for p in model.parameters() if p.requires_grad]
    expected = max(1.0, float(rates.sum()))
    gsm, optimizer = dp_components(model, settings, expected, learning_rate, generator)
    if on_grads is not None:
        optimizer.attach_step_hook(lambda _optimizer: on_grads())
    rng = np.random.default_rng(seed)
    pad = int(tokenizer.pad_token_id)
    p0 = params[0]
    started, losses, empty = time.perf_counter(), [], 0
    model.train()
    try:
        for _ in range(steps):
            chosen = np.flatnonzero(rng.random(len(examples)) < rates)
            before = [p.detach().clone() for p in params]
            if len(chosen) == 0:
                empty += 1
                for p in params:  # the clipped sum is zero; the step is noise only
                    p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]  # Opacus' per-sample field
                optimizer.step()
            else:
                loss_sum = 0.0
                for last, part in _micro_batches(chosen, settings.micro_batch):
                    batch = to_device(
                        collate([encode(tokenizer, examples[i], max_seq_len) for i in part], pad, TRAIN_PAD_MULTIPLE),
                        p0.device,
                    )
                    per_example = per_sample_answer_loss(model, batch)
                    loss_sum += float(per_example.detach().sum())
                    if not math.isfinite(loss_sum):
                        raise FloatingPointError(f"DP training loss became {loss_sum}")
                    per_example.mean().backward()
                    if not last:  # clip and add this micro-batch's examples; noise and step after the last
                        optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss_sum / len(chosen))
            optimizer.zero_grad(set_to_none=True)
            accountant.record(settings.noise_multiplier, settings.sample_rate, 1)
            _check_updated(params, before, settings.noise_multiplier > 0 or len(chosen) > 0)
    finally:
        gsm._close()
        model.eval()
    epsilon = accountant.epsilon(settings.delta)
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    return DpTrainResult(mean_loss, steps, time.perf_counter() - started, epsilon, empty)


def _micro_batches(chosen: np.ndarray, size: int) -> list[tuple[bool, np.ndarray]]:
    """The draw in consecutive parts of ``size`` (0: one part), each flagged whether it is the last."""
    size = size if size > 0 else len(chosen)
    parts = [chosen[i : i + size] for i in range(0, len(chosen), size)]
    return [(k == len(parts) - 1, part) for k, part in enumerate(parts)]


DP_OPTIMIZERS = ("adam", "sgd")


def dp_components(
    model: PeftModel, settings: DpSettings, expected_batch: float, learning_rate: float, generator: torch.Generator
) -> tuple[Any, Any]:
    """Opacus' per-sample gradient hooks on the LoRA layers and its clipping+noise optimizer."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not all(_is_lora(n) for n, p in model.named_parameters() if p.requires_grad):
        raise RuntimeError("DP training expects the LoRA parameters, and only them, to be trainable")
    if settings.optimizer not in DP_OPTIMIZERS:
        raise ValueError(f"DP optimizer must be one of {', '.join(DP_OPTIMIZERS)}, got {settings.optimizer!r}")
    inner: torch.optim.Optimizer
    if settings.optimizer == "sgd":
        inner = torch.optim.SGD(params, lr=learning_rate, momentum=settings.momentum)
    else:
        inner = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    # Opacus' hooks on layers whose inputs need no gradient (the frozen base's): expected, not the user's business
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients", category=UserWarning)
    # strict=False: Llama's rotary buffers are not trainable state; only the LoRA linears get hooks.
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    optimizer = DPOptimizer(
        inner,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=expected_batch,  # the mean's divisor; a float is fine
        loss_reduction="mean",
        generator=generator,
    )
    return gsm, optimizer


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _check_updated(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor], expect_change: bool) -> None:
    """Fail loudly on a silent no-op DP step (Opacus issue 820, seen with some PEFT versions)."""
    import torch

    if expect_change and all(torch.equal(p, b) for p, b in zip(params, before, strict=True)):
        raise RuntimeError(
            "a DP-SGD step left every LoRA weight unchanged (Opacus issue 820): "
            "per-sample gradients are not reaching the optimizer"
        )
