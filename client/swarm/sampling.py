"""Choosing the next token from its logits: greedy, or sampled with temperature and nucleus (top-p).

Sampling draws from a generator seeded per generation, never from torch's global RNG, so a
request that names a seed gets the same tokens again whatever else the process is doing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; ``temperature == 0`` is greedy decoding (``top_p`` and ``seed`` unused)."""

    temperature: float = 0.0  # logits are divided by it before the softmax; 0: argmax
    top_p: float = 1.0  # keep the most likely tokens whose probabilities add up to this
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise InputError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TokenPicker:
    """One generation's token choice: stateful only through its seeded generator."""

    def __init__(self, sampling: Sampling | None = None) -> None:
        import torch

        self.sampling = sampling or Sampling()
        self._generator: torch.Generator | None = None
        if not self.sampling.greedy:
            seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from one position's ``[vocab]`` logits."""
        import torch

        if self._generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            probs = _nucleus(probs, self.sampling.top_p)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with all but the smallest most-likely set reaching ``top_p`` zeroed (the top token always stays)."""
    import torch

    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # probability mass of the tokens ranked above each
    ordered = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum()
