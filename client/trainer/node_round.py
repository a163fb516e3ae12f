"""One training round on a node: adapter in, local (optionally DP) training, adapter out."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.client.trainer.runtime import Shard
from fedswarm.common.codecs import AdapterCodec, codec_for
from fedswarm.common.config import NodeConfig
from fedswarm.common.contract import Reply
from fedswarm.common.seeds import DP_NOISE, round_seed

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class RoundOutput:
    state: dict[str, torch.Tensor] | None  # None when the node declined to train
    metrics: dict[str, float | int]
    privacy_history: str | None  # accountant history (JSON) after this round
    note: str = ""  # why the node declined, when it did


def node_rank(cfg: NodeConfig, node_config: Mapping[str, Any], partition_id: int) -> int:
    """This node's LoRA rank: node config ``lora-rank``, else ``--client-ranks``, else ``--lora-rank``."""
    if "lora-rank" in node_config:
        return int(node_config["lora-rank"])
    ranks = cfg.ranks()
    return ranks[max(partition_id, 0) % len(ranks)]


def prepare_adapter(
    model: PeftModel,
    codec: AdapterCodec,
    received: dict[str, torch.Tensor],
    rank: int,
    initial: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load the global adapter as the codec rebuilds it at this node's rank; train what the codec trains.

    ``initial`` is the node's seeded adapter (its frozen A under ffa, the filler rows of a rank
    padding): the rebuild starts from it, not from what the model holds after another message.
    """
    from fedswarm.common.lora_state import adapter_state, load_adapter_state

    load_adapter_state(model, codec.rebuild(initial if initial is not None else adapter_state(model), received, rank))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(codec.trainable(name))


def outgoing(model: PeftModel, cfg: NodeConfig) -> dict[str, torch.Tensor]:
    """What the node sends back: the tensors its codec trains."""
    from fedswarm.common.lora_state import adapter_state

    return codec_for(cfg).reply(adapter_state(model))


def train_round(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    shard: Shard,
    cfg: NodeConfig,
    server_round: int,
    privacy_history: str | None,
    on_grads: Callable[[], None] | None = None,
) -> RoundOutput:
    """Local training (DP-SGD under ``--dp``); ``on_grads`` sees every step's gradients (SCAFFOLD)."""
    seed = round_seed(cfg.seed, server_round, shard.partition_id)
    if cfg.dp:
        return _train_dp(model, tokenizer, shard, cfg, seed, privacy_history, on_grads)
    from fedswarm.client.trainer.local_train import train_lora

    result = train_lora(
        model, tokenizer, shard.train, cfg.local_steps, cfg.batch_size, cfg.learning_rate,
        cfg.max_seq_len, seed, cfg.precision, on_grads, cfg.balance_labels,
    )  # fmt: skip
    metrics = {Reply.TRAIN_LOSS: result.loss, Reply.STEPS: result.steps, Reply.SECONDS: result.seconds}
    return RoundOutput(outgoing(model, cfg), metrics, None)


def _train_dp(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    shard: Shard,
    cfg: NodeConfig,
    seed: int,
    privacy_history: str | None,
    on_grads: Callable[[], None] | None,
) -> RoundOutput:
    from fedswarm.client.trainer.privacy import Accountant, DpSettings, noise_generator, sample_rates, train_lora_dp

    rates = sample_rates(shard.train, cfg.dp_batch_size, cfg.balance_labels)
    q = float(rates.max())  # every example is accounted at the largest rate
    sigma = cfg.noise_multiplier or _calibrated(cfg, q)
    settings = DpSettings(
        sigma, cfg.max_grad_norm, cfg.delta, cfg.epsilon, q, cfg.accountant, cfg.dp_optimizer, cfg.dp_momentum,
        cfg.batch_size,
    )  # fmt: skip
    accountant = Accountant.loads(privacy_history or "[]", cfg.accountant)
    base = _privacy_metrics(settings, accountant.epsilon(cfg.delta), 0)
    if cfg.epsilon > 0:
        projected = accountant.epsilon(cfg.delta, extra=(sigma, q, cfg.local_steps))
        if projected > cfg.epsilon * (1 + 1e-9):
            note = f"declined: the next round would reach epsilon {projected:.3f} ({cfg.accountant})"
            note += f" > budget {cfg.epsilon}"
            metrics = {**base, Reply.DECLINED: 1, Reply.PROJECTED_EPSILON: projected}
            return RoundOutput(None, metrics, accountant.dumps(), note)
    result = train_lora_dp(
        model, tokenizer, shard.train, cfg.local_steps, cfg.dp_lr(), cfg.max_seq_len, settings, accountant,
        seed, noise_generator(_noise_seed(cfg, seed), _device_of(model)), on_grads, rates,
    )  # fmt: skip
    metrics = {
        **_privacy_metrics(settings, result.epsilon, result.steps),
        Reply.TRAIN_LOSS: result.loss,
        Reply.SECONDS: result.seconds,
        Reply.EMPTY_BATCHES: result.empty_batches,
        Reply.DP_STEPS_TOTAL: accountant.steps,
        Reply.EXPECTED_BATCH: float(rates.sum()),
    }
    return RoundOutput(outgoing(model, cfg), metrics, accountant.dumps())


@functools.lru_cache(maxsize=64)
def _noise_for(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from fedswarm.client.trainer.privacy import calibrate_noise

    return calibrate_noise(epsilon, delta, q, steps, accountant)


def _calibrated(cfg: NodeConfig, q: float) -> float:
    """The noise that spends ``--epsilon`` over every round's steps at rate ``q`` (cached: PRV takes seconds)."""
    return _noise_for(cfg.epsilon, cfg.delta, q, cfg.rounds * cfg.local_steps, cfg.accountant)


def _noise_seed(cfg: NodeConfig, batch_seed: int) -> int | None:
    """``--dp-seed``'s noise stream for this node and round (None: noise seeded from the OS)."""
    return None if cfg.dp_seed < 0 else round_seed(cfg.dp_seed, 0, batch_seed, DP_NOISE)


def _device_of(model: PeftModel) -> str:
    return str(next(model.parameters()).device.type)


def _privacy_metrics(settings: Any, epsilon: float, steps: int) -> dict[str, float | int]:
    return {
        Reply.EPSILON: epsilon,
        Reply.DELTA: settings.delta,
        Reply.NOISE_MULTIPLIER: settings.noise_multiplier,
        Reply.MAX_GRAD_NORM: settings.max_grad_norm,
        Reply.SAMPLE_RATE: settings.sample_rate,
        Reply.STEPS: steps,
    }
