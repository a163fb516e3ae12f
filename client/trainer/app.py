"""The fedswarm ClientApp: trains the received global LoRA adapter on this node's data.

Only the adapter tensors and scalar metrics (plus, under DP, the accountant's history)
leave the node; the base model is loaded once per process and reused across rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedswarm.client.trainer.drift import DriftCorrection
from fedswarm.client.trainer.node_round import node_rank, prepare_adapter, train_round
from fedswarm.client.trainer.proximal import ProximalTerm, chain
from fedswarm.client.trainer.runtime import Shard, lora_model, shard_for
from fedswarm.common.codecs import codec_for
from fedswarm.common.config import NodeConfig, from_run_config
from fedswarm.common.contract import (
    CONTROL_KEY,
    NODE_INFO_KEY,
    PRIVACY_KEY,
    Reply,
    Sent,
    arrays_of,
    from_record,
    is_packed,
    to_record,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

app = ClientApp()


@dataclass(frozen=True)
class Prepared:
    """Everything a handler works with: settings, this node's data and its model with the adapter."""

    cfg: NodeConfig
    server_round: int
    device: str
    shard: Shard
    rank: int
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


def _prepare(msg: Message, context: Context) -> Prepared:
    """Read the settings, pick threads and device, and load the received adapter at this node's rank."""
    import torch

    from fedswarm.common.device import check_quantize_base, resolve_device

    config = dict(msg.content["config"])
    cfg = from_run_config(NodeConfig, config)
    threads = max(1, int(cfg.cpus_per_client))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    check_quantize_base(cfg.quantize_base, device)
    shard = shard_for(context.node_config, cfg, str(config.get(Sent.POOL, "")))
    if shard.partition_id < 0:  # a deployed node: its own batch-order and DP-noise seed stream
        shard = replace(shard, partition_id=int(context.node_id) % 1_000_003)
    rank = node_rank(cfg, context.node_config, shard.partition_id)
    loaded = lora_model(cfg.model, rank, cfg.lora_alpha, cfg.seed, device, cfg.quantize_base)
    model, tokenizer = loaded.model, loaded.tokenizer
    prepare_adapter(model, codec_for(cfg), arrays_of(msg.content), rank, loaded.initial)
    return Prepared(cfg, int(str(config.get(Sent.SERVER_ROUND, 0))), device, shard, rank, model, tokenizer)


def _privacy_history(msg: Message, context: Context) -> str | None:
    """The node's own accountant state; else the coordinator's copy (e.g. after a node restart)."""
    if PRIVACY_KEY in context.state:
        return str(context.state[PRIVACY_KEY]["history"])
    sent = msg.content["config"].get(Sent.DP_HISTORY)
    return str(sent) if sent else None


def _drift_correction(msg: Message, context: Context, job: Prepared) -> DriftCorrection:
    """SCAFFOLD for this round: the coordinator's c (absent in round 1) and this node's own c_i."""
    server = msg.content.array_records.get(CONTROL_KEY)
    own = context.state.array_records.get(CONTROL_KEY)
    return DriftCorrection(
        job.model,
        from_record(server) if server is not None else None,
        from_record(own) if own is not None else None,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; replies with the adapter and train metrics."""
    from fedswarm.client.trainer.node_info import node_info
    from fedswarm.common.memory import peak_rss_mb, release_free_memory, reset_peak_rss

    release_free_memory()  # what the last message freed goes back to the system first
    reset_peak_rss()  # the reply's peak-rss-mb is this message's (model loading included where it happens)
    job = _prepare(msg, context)
    drift = _drift_correction(msg, context, job) if job.cfg.scaffold else None
    proximal = ProximalTerm(job.model, job.cfg.proximal_mu) if job.cfg.proximal_mu > 0 else None
    out = train_round(
        job.model, job.tokenizer, job.shard, job.cfg, job.server_round, _privacy_history(msg, context),
        chain(drift, proximal),
    )  # fmt: skip
    if out.privacy_history is not None:
        context.state[PRIVACY_KEY] = ConfigRecord({"history": out.privacy_history})
    metrics = {
        **out.metrics,
        Reply.NUM_EXAMPLES: len(job.shard.train),
        Reply.UNIT_WEIGHT: 1,
        Reply.LORA_RANK: job.rank,
        Reply.PEAK_RSS_MB: peak_rss_mb(),
    }
    content = RecordDict(
        {"metrics": MetricRecord(dict(metrics)), NODE_INFO_KEY: ConfigRecord(dict(node_info(job.device)))}
    )
    if out.state is not None:
        content["arrays"] = to_record(out.state, packed=is_packed(msg.content.array_records["arrays"]))
    if drift is not None and out.state is not None:  # this round's c_i: kept on the node, sent for c
        control = to_record(drift.control())
        context.state[CONTROL_KEY] = control
        content[CONTROL_KEY] = control
    if out.privacy_history is not None:
        content[PRIVACY_KEY] = ConfigRecord({"history": out.privacy_history, "note": out.note})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received adapter on this node's own validation slice."""
    from fedswarm.common.evaluate import evaluate as run_eval

    job = _prepare(msg, context)
    examples = job.shard.validation or job.shard.train[:8]
    result = run_eval(job.model, job.tokenizer, examples, job.cfg.max_seq_len)
    values: dict[str, float | int] = {Reply.EVAL_LOSS: result.loss, Reply.NUM_EXAMPLES: result.examples}
    if result.accuracy is not None:
        values[Reply.EVAL_ACCURACY] = result.accuracy
    return Message(content=RecordDict({"metrics": MetricRecord(dict(values))}), reply_to=msg)
