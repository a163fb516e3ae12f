"""DP-SGD on the LoRA parameters with Opacus, and the node's cumulative RDP accountant.

The accountant's history (noise multiplier, sample rate, steps) is kept in the node's
persistent state between rounds, so epsilon accumulates instead of restarting with
every new PrivacyEngine. Batches are Poisson-sampled (each example joins a step with
probability q), which is what the RDP analysis assumes; an empty draw still takes a
noisy step, as the analysis requires.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedswarm.common.batches import collate, encode, per_sample_answer_loss, to_device
from fedswarm.common.data import Example

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
    sample_rate: float  # q = expected batch / local examples


@dataclass
class Accountant:
    """RDP accountant whose state is a plain list, so it can live in Flower's node state."""

    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = list(self.history) + ([extra] if extra else [])
        return float(accountant.get_epsilon(delta)) if accountant.history else 0.0

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
    def loads(cls, text: str) -> Accountant:
        return cls([(float(a), float(b), int(c)) for a, b, c in json.loads(text or "[]")])


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' own calibration: the sigma that reaches ``epsilon`` after ``steps`` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )
    )


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
) -> DpTrainResult:
    """``steps`` DP-SGD steps; updates ``accountant`` in place (only for steps taken).

    ``on_grads`` sees each step's clipped, noised gradients before AdamW does (Opacus' step hook).
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    expected = max(1, round(settings.sample_rate * len(examples)))
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
            chosen = np.flatnonzero(rng.random(len(examples)) < settings.sample_rate)
            before = [p.detach().clone() for p in params]
            if len(chosen) == 0:
                empty += 1
                for p in params:  # the clipped sum is zero; the step is noise only
                    p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
            else:
                batch = to_device(
                    collate([encode(tokenizer, examples[i], max_seq_len) for i in chosen], pad), p0.device
                )
                loss = per_sample_answer_loss(model, batch).mean()
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"DP training loss became {float(loss.detach())}")
                loss.backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            accountant.record(settings.noise_multiplier, settings.sample_rate, 1)
            _check_updated(params, before, settings.noise_multiplier > 0 or len(chosen) > 0)
    finally:
        gsm._close()
        model.eval()
    epsilon = accountant.epsilon(settings.delta)
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    return DpTrainResult(mean_loss, steps, time.perf_counter() - started, epsilon, empty)


def dp_components(
    model: PeftModel, settings: DpSettings, expected_batch: int, learning_rate: float, generator: torch.Generator
) -> tuple[Any, Any]:
    """Opacus' per-sample gradient hooks on the LoRA layers and its clipping+noise optimizer."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not all(_is_lora(n) for n, p in model.named_parameters() if p.requires_grad):
        raise RuntimeError("DP training expects the LoRA parameters, and only them, to be trainable")
    # strict=False: Llama's rotary buffers are not trainable state; only the LoRA linears get hooks.
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=generator,
    )
    return gsm, optimizer


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _check_updated(params: list[torch.Tensor], before: list[torch.Tensor], expect_change: bool) -> None:
    """Fail loudly on a silent no-op DP step (Opacus issue 820, seen with some PEFT versions)."""
    import torch

    if expect_change and all(torch.equal(p, b) for p, b in zip(params, before, strict=True)):
        raise RuntimeError(
            "a DP-SGD step left every LoRA weight unchanged (Opacus issue 820): "
            "per-sample gradients are not reaching the optimizer"
        )
