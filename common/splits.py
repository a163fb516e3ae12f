"""The fixed held-out split, and each node's train/validation slices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HOLDOUT_SALT = 7919  # keeps the held-out permutation independent of the partitioning seeds


@dataclass(frozen=True)
class Split:
    holdout: np.ndarray  # indices never given to any client
    train: np.ndarray  # indices that partitioning distributes


def holdout_split(n: int, eval_size: int, seed: int) -> Split:
    """Seeded split of ``n`` records into a held-out set of ``eval_size`` and the rest."""
    if eval_size < 1:
        raise ValueError(f"eval-size must be >= 1, got {eval_size}")
    if n < eval_size + 2:
        raise ValueError(f"the data has {n} records: too few for a held-out split of {eval_size} plus training")
    perm = np.random.default_rng([seed, HOLDOUT_SALT]).permutation(n)
    return Split(holdout=np.sort(perm[:eval_size]), train=np.sort(perm[eval_size:]))


def node_slices(indices: Sequence[int], val_fraction: float = 0.1, max_val: int = 32) -> tuple[list[int], list[int]]:
    """A node's own (train, validation) slices of its partition; validation is never trained on."""
    items = list(indices)
    if len(items) < 2:
        return items, []
    n_val = min(max_val, max(1, int(len(items) * val_fraction)))
    return items[n_val:], items[:n_val]
