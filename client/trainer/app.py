"""The fedswarm ClientApp: trains the received global LoRA adapter on this node's data.

Only the adapter tensors and scalar metrics leave the node; the base model is loaded
once per process and reused across rounds.
"""

from __future__ import annotations

import logging

from fedswarm.client.trainer.runtime import lora_model, shard_for
from fedswarm.common.config import FederationConfig, from_run_config
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[FederationConfig, int]:
    import torch

    cfg = from_run_config(FederationConfig, dict(msg.content["config"]))
    threads = max(1, int(cfg.cpus_per_client))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return cfg, int(msg.content["config"].get("server-round", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; replies with the adapter and train metrics."""
    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.lora import adapter_state, load_adapter_state
    from fedswarm.common.memory import peak_rss_mb

    cfg, server_round = _setup(msg, context)
    model, tokenizer = lora_model(cfg.model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    shard = shard_for(context.node_config, cfg)
    load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    result = train_lora(
        model,
        tokenizer,
        shard.train,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed * 1_000_003 + server_round * 1009 + shard.partition_id,
        precision=cfg.precision,
    )
    metrics = MetricRecord(
        {
            "train-loss": result.loss,
            "num-examples": len(shard.train),
            "steps": result.steps,
            "seconds": result.seconds,
            "peak-rss-mb": peak_rss_mb(),
        }
    )
    arrays = ArrayRecord(adapter_state(model))
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received adapter on this node's own validation slice."""
    from fedswarm.common.evaluate import evaluate as run_eval
    from fedswarm.common.lora import load_adapter_state

    cfg, _ = _setup(msg, context)
    model, tokenizer = lora_model(cfg.model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    shard = shard_for(context.node_config, cfg)
    load_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    examples = shard.validation or shard.train[:8]
    result = run_eval(model, tokenizer, examples, cfg.max_seq_len)
    values: dict[str, float | int] = {"eval-loss": result.loss, "num-examples": result.examples}
    if result.accuracy is not None:
        values["eval-accuracy"] = result.accuracy
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
