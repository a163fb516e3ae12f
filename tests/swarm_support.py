"""Helpers shared by the swarm's adapter and batching tests: seeded adapters, a float32 round-off bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedswarm.common.model import load_model, tiny_config


def make_adapter(folder: Path, seed: int, rank: int = 4, alpha: float = 8.0, b_seed: int | None = None) -> Path:
    """A PEFT adapter of the tiny model with random A (from ``seed``) and random, non-zero B (from ``b_seed``,
    default ``1000 + seed``)."""
    from fedswarm.common.lora import attach_lora

    peft_model = attach_lora(load_model("tiny"), rank=rank, alpha=alpha, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed if b_seed is None else b_seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


def roundoff_tol(reference: torch.Tensor, config: Any = None) -> float:
    """A float32 round-off bound for two computations of ``reference`` that differ only in kernels.

    A dot product of length n has relative rounding error at most n·eps (Higham's gamma_n); each
    block's longest is the MLP's (intermediate_size), and the blocks' errors add up. Relative to
    the largest magnitude, that gives eps · |reference|max · intermediate_size · layers.
    """
    config = config or tiny_config()
    eps = torch.finfo(torch.float32).eps
    return float(eps * reference.abs().max() * config.intermediate_size * config.num_hidden_layers)
