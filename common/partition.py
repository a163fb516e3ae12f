"""Partitioning the training pool across clients: IID or Dirichlet label skew, from a seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedswarm.common.errors import FedswarmError

MAX_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "iid" or "dirichlet"
    alpha: float = 0.0  # Dirichlet concentration; smaller means more label skew


def parse_partition(value: str) -> PartitionSpec:
    """``iid`` or ``dirichlet:ALPHA`` with ALPHA > 0."""
    if value == "iid":
        return PartitionSpec("iid")
    kind, _, alpha = value.partition(":")
    if kind == "dirichlet":
        try:
            a = float(alpha)
        except ValueError:
            a = -1.0
        if a > 0 and np.isfinite(a):
            return PartitionSpec("dirichlet", a)
    raise FedswarmError(f"--partition {value!r}: expected 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")


def partition(
    indices: Sequence[int], labels: Sequence[str | None], num_parts: int, spec: PartitionSpec, seed: int
) -> list[list[int]]:
    """Split ``indices`` into ``num_parts`` disjoint, non-empty parts that cover them all.

    ``labels[i]`` is the label of ``indices[i]`` (needed for Dirichlet skew).
    """
    idx = np.asarray(indices)
    if num_parts < 1:
        raise FedswarmError(f"--clients must be >= 1, got {num_parts}")
    if len(idx) < num_parts:
        raise FedswarmError(f"{len(idx)} training records cannot be split over {num_parts} clients")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return [sorted(p.tolist()) for p in np.array_split(rng.permutation(idx), num_parts)]
    if any(label is None for label in labels):
        raise FedswarmError("--partition dirichlet needs labelled data (the records have no label)")
    return _dirichlet(idx, np.asarray(labels), num_parts, spec.alpha, rng)


def _dirichlet(
    idx: np.ndarray, labels: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    classes = sorted(set(labels.tolist()))
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for cls in classes:
            members = rng.permutation(idx[labels == cls])
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) > 0:
            return [sorted(p) for p in parts]
    raise FedswarmError(
        f"--partition dirichlet:{alpha}: could not give every one of {num_parts} clients a record; "
        "raise ALPHA or lower --clients"
    )
