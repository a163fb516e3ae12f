"""What a node process loads once and reuses across rounds: the base model and its data."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.common.config import NodeConfig
from fedswarm.common.data import Example, load_examples
from fedswarm.common.errors import FedswarmError
from fedswarm.common.splits import node_slices, pool_partition

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Shard:
    train: list[Example]
    validation: list[Example]  # the node's own slice, never trained on
    partition_id: int


@dataclass(frozen=True)
class Loaded:
    """What a node process keeps across messages: the model with its LoRA wrapper, and the adapter it started with."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    initial: dict[str, torch.Tensor]  # the seeded adapter: what every message is rebuilt from, never trained


@functools.lru_cache(maxsize=1)
def lora_model(model: str, rank: int, alpha: float, seed: int, device: str = "cpu", quantize: str = "") -> Loaded:
    """The base model with a LoRA adapter, built once per process; each message overwrites the adapter.

    Nothing of one message's adapter may reach the next (another run, or another virtual
    client in the same Ray actor or warm worker): the node rebuilds its adapter from what it
    received and :attr:`Loaded.initial`, never from the weights the last message left.
    """
    from fedswarm.common.lora_state import adapter_state, attach_lora
    from fedswarm.common.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    wrapped = attach_lora(load_model(model, device=device, quantize=quantize), rank, alpha, seed)
    initial = {k: v.detach().clone() for k, v in adapter_state(wrapped).items()}
    return Loaded(wrapped, tokenizer, initial)


@functools.lru_cache(maxsize=2)
def examples(data: str, max_samples: int) -> list[Example]:
    return load_examples(data, max_samples)


def simulated_shard(node_config: Mapping[str, Any], cfg: NodeConfig, pool: str = "") -> Shard:
    """This virtual node's partition of the shared pool ``pool`` (the held-out split excluded).

    ``pool`` is the run's ``data``, which a simulation's coordinator sends its virtual nodes
    (they share its machine); a deployed node is never sent it.
    """
    pid, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    records, train, validation = pool_partition(
        pool, cfg.max_samples, cfg.eval_size, cfg.seed, cfg.partition, pid, parts
    )
    return Shard([records[i] for i in train], [records[i] for i in validation], pid)


def local_shard(data_path: str, cfg: NodeConfig) -> Shard:
    """A deployed node's own file: all of it is this node's, a slice kept for validation."""
    records = examples(data_path, cfg.max_samples)
    train, validation = node_slices(range(len(records)))
    return Shard([records[i] for i in train], [records[i] for i in validation], -1)


def shard_for(node_config: Mapping[str, Any], cfg: NodeConfig, pool: str) -> Shard:
    """A deployed node's own file (node config ``data-path``), else a simulated node's partition of ``pool``."""
    if "data-path" in node_config:
        return local_shard(str(node_config["data-path"]), cfg)
    if not pool:
        raise FedswarmError("this node has no data: give it --data (node config data-path)")
    return simulated_shard(node_config, cfg, pool)
