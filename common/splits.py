"""The fixed held-out split, and each node's train/validation slices."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    from fedswarm.common.data import Example

HOLDOUT_SALT = 7919  # keeps the held-out permutation independent of the partitioning seeds


@dataclass(frozen=True)
class Split:
    holdout: np.ndarray  # indices never given to any client
    train: np.ndarray  # indices that partitioning distributes


def holdout_split(n: int, eval_size: int, seed: int) -> Split:
    """Seeded split of ``n`` records into a held-out set of ``eval_size`` and the rest."""
    if eval_size < 1:
        raise InputError(f"eval-size must be >= 1, got {eval_size}")
    if n < eval_size + 2:
        raise InputError(f"the data has {n} records: too few for a held-out split of {eval_size} plus training")
    perm = np.random.default_rng([seed, HOLDOUT_SALT]).permutation(n)
    return Split(holdout=np.sort(perm[:eval_size]), train=np.sort(perm[eval_size:]))


@functools.lru_cache(maxsize=2)
def run_records(data: str, max_samples: int, eval_size: int, seed: int) -> tuple[list[Example], Split]:
    """A run's records and its held-out split: the one place that decides what is never trained on.

    The coordinator evaluates on ``split.holdout``, simulated nodes partition ``split.train``,
    and the edge export's parity check reads held-out texts from the same split (cached: a
    node process reuses it every round).
    """
    from fedswarm.common.data import load_examples

    records = load_examples(data, max_samples)
    return records, holdout_split(len(records), eval_size, seed)


def run_records_of(config: Mapping[str, Any]) -> tuple[list[Example], Split]:
    """``run_records`` for a finished run's ``summary.json`` config (FederationConfig's defaults where absent)."""
    from fedswarm.common.config import FederationConfig

    default = FederationConfig()
    return run_records(
        str(config.get("data") or default.data),
        int(config.get("max_samples") or default.max_samples),
        int(config.get("eval_size") or default.eval_size),
        int(config.get("seed") or default.seed),
    )


def pool_partition(
    data: str, max_samples: int, eval_size: int, seed: int, spec: str, partition_id: int, partitions: int
) -> tuple[list[Example], list[int], list[int]]:
    """A simulated node's share of the run's pool: the records and its (train, validation) indices.

    The pool is ``run_records``' training side (the held-out split never reaches a node),
    partitioned by ``spec`` (``iid``, ``dirichlet:ALPHA``); the node's slices are
    :func:`node_slices` of its partition, as a deployed node's are of its own file.
    """
    from fedswarm.common.partition import parse_partition, partition

    records, split = run_records(data, max_samples, eval_size, seed)
    labels = [records[i].label for i in split.train]
    mine = partition(split.train.tolist(), labels, partitions, parse_partition(spec), seed)[partition_id]
    train, validation = node_slices(mine)
    return records, train, validation


def node_slices(indices: Sequence[int], val_fraction: float = 0.1, max_val: int = 32) -> tuple[list[int], list[int]]:
    """A node's own (train, validation) slices of its partition; validation is never trained on."""
    items = list(indices)
    if len(items) < 2:
        return items, []
    n_val = min(max_val, max(1, int(len(items) * val_fraction)))
    return items[n_val:], items[:n_val]
