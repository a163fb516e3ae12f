"""The coordinator's evaluation of the global adapter on the fixed held-out split."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedswarm.common.config import FederationConfig
from fedswarm.common.data import Example
from fedswarm.common.evaluate import EvalResult, constant_answer, evaluate
from fedswarm.common.lora_state import adapter_state, attach_lora, load_adapter_state
from fedswarm.common.model import load_model, load_tokenizer
from fedswarm.common.splits import run_records

if TYPE_CHECKING:
    import torch


class CentralEvaluator:
    """Holds the base model + adapter and the held-out examples for the whole run."""

    def __init__(self, cfg: FederationConfig) -> None:
        import torch

        from fedswarm.common.device import resolve_device

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        device = resolve_device(cfg.device)
        self.model = attach_lora(load_model(cfg.model, device=device), cfg.server_rank(), cfg.lora_alpha, cfg.seed)
        records, split = run_records(cfg.data, cfg.max_samples, cfg.eval_size, cfg.seed)
        self.holdout: list[Example] = [records[i] for i in split.holdout]
        self.constant = constant_answer(self.holdout)  # (label, share): the accuracy floor
        self.last_seconds = 0.0

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The seeded initial adapter (B = 0, so it equals the untouched base model)."""
        return {k: v.cpu() for k, v in adapter_state(self.model).items()}

    def __call__(self, state: Mapping[str, torch.Tensor]) -> EvalResult:
        started = time.perf_counter()
        load_adapter_state(self.model, state)
        result = evaluate(self.model, self.tokenizer, self.holdout, self.cfg.max_seq_len)
        self.last_seconds = time.perf_counter() - started
        return result
