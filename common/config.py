"""The run configuration: one flat dataclass, read from the CLI or Flower's run config.

Field names map to kebab-case run-config keys (``local_steps`` -> ``local-steps``), the
keys of ``[tool.flwr.app.config]`` in pyproject.toml, so ``fedswarm simulate`` and
``flwr run .`` accept the same settings. The CLI is generated from the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

FLOWER_KEYS = {"rounds": "num-server-rounds"}


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class FederationConfig:
    """Everything a federated run needs; units in each help text."""

    model: str = _opt("smollm2-135m", "base model: smollm2-135m, tiny, or a local HF folder")
    data: str = _opt("sarcasm", "data: sarcasm, diabetes, or a .jsonl/.csv file")
    clients: int = _opt(4, "number of (virtual) client nodes")
    rounds: int = _opt(3, "federated rounds")
    local_steps: int = _opt(16, "optimizer steps per client per round")
    batch_size: int = _opt(8, "examples per local step")
    learning_rate: float = _opt(2e-3, "AdamW learning rate")
    lora_rank: int = _opt(8, "LoRA rank r")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r)")
    partition: str = _opt("iid", "iid or dirichlet:ALPHA (label skew)")
    seed: int = _opt(0, "seed of the held-out split, partitions, adapter init and batch order")
    eval_size: int = _opt(200, "held-out examples, never given to a client")
    max_samples: int = _opt(0, "read at most this many records (0: all)")
    max_seq_len: int = _opt(128, "tokens per example (prompt cut from the left)")
    precision: str = _opt("auto", "training autocast: auto (bf16 where the CPU has it natively), bf16, fp32")
    fraction_evaluate: float = _opt(0.0, "share of nodes running federated evaluation each round")
    cpus_per_client: float = _opt(1.0, "CPU cores reserved per virtual client (Ray)")
    out: str = _opt("", "run folder (default runs/run-DATE-TIME): metrics.jsonl, checkpoints, adapter/")

    def __post_init__(self) -> None:
        positive = ("clients", "rounds", "local_steps", "batch_size", "lora_rank", "eval_size", "max_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"--fraction-evaluate must be within [0, 1], got {self.fraction_evaluate}")
        if self.cpus_per_client <= 0:
            raise ValueError(f"--cpus-per-client must be > 0, got {self.cpus_per_client}")

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config form (kebab-case keys)."""
        return {run_key(f.name): getattr(self, f.name) for f in fields(self)}


def run_key(name: str) -> str:
    return FLOWER_KEYS.get(name, name.replace("_", "-"))


def from_run_config(cls: type[T], run_config: Mapping[str, Any]) -> T:
    """Build ``cls`` from a Flower run config, ignoring keys it does not know."""
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = run_key(f.name)
        if key in run_config:
            default = f.default
            kwargs[f.name] = type(default)(run_config[key]) if default is not None else run_config[key]
    return cls(**kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--kebab-case`` option per dataclass field, typed and documented from it."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default
        kind = type(default) if default is not dataclasses.MISSING and default is not None else str
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=default,
            help=f"{f.metadata.get('help', '')} (default: {default})",
        )


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})
