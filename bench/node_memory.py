"""Peak RSS per round of one training process that keeps the model (a warm node, a Ray actor).

Runs fedswarm's ClientApp in this process for ``--rounds`` train messages of one simulated
node, the way a warm worker or a Ray actor does, and prints each round's peak and final
resident memory (the reply's ``peak-rss-mb``: VmHWM reset at every message). Goal (issue 15):
every round under 2.5 GB on the default model, flat from round 2 on.

    .venv/bin/python bench/node_memory.py [--model smollm2-135m] [--rounds 5] [--dp]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedswarm.client.trainer.app import app
    from fedswarm.common.codecs import codec_for
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.contract import Reply, arrays_of, number, to_record
    from fedswarm.common.memory import peak_rss_mb, rss_mb
    from fedswarm.server.coordinator.round_plan import round_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--aggregation", default="ffa")
    parser.add_argument("--dp", action="store_true")
    args = parser.parse_args()
    extra = {"dp": True, "epsilon": 8.0} if args.dp else {}
    cfg = FederationConfig(model=args.model, aggregation=args.aggregation, rounds=args.rounds, **extra)
    print(f"{args.model}, {cfg.aggregation}, {cfg.local_steps} steps x batch {cfg.batch_size}, dp={cfg.dp}, "
          f"torch threads {torch.get_num_threads()}, RSS at start {rss_mb():.0f} MB")  # fmt: skip
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {})
    state: dict | None = None
    _initial_full(cfg)  # loads the model (a node does it in its first message)
    print(f"loading the model: peak RSS {peak_rss_mb():.0f} MB, RSS after {rss_mb():.0f} MB")
    print("round | peak RSS MB | RSS after MB | seconds")
    for round_no in range(1, args.rounds + 1):
        arrays = state if state is not None else {}
        content = RecordDict({"config": round_config(cfg, round_no, simulated=True)})
        if arrays:
            content["arrays"] = to_record(codec_for(cfg).outgoing(arrays))
        else:  # round 1: the seeded adapter, packed, as the coordinator sends it
            content["arrays"] = to_record(_initial(cfg))
        started = time.perf_counter()
        reply = app(message=Message(content=content, dst_node_id=0, message_type="train"), context=context)
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content["metrics"]
        state = {**(state or _initial_full(cfg)), **arrays_of(reply.content)}
        print(f"{round_no:>5} | {number(metrics, Reply.PEAK_RSS_MB):11.0f} | {rss_mb():12.0f} | "
              f"{time.perf_counter() - started:7.1f}")  # fmt: skip


_CACHE: dict[str, dict] = {}


def _initial_full(cfg) -> dict:
    if "full" not in _CACHE:
        from fedswarm.client.trainer.runtime import lora_model

        loaded = lora_model(cfg.model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        _CACHE["full"] = dict(loaded.initial)
    return _CACHE["full"]


def _initial(cfg) -> dict:
    from fedswarm.common.codecs import codec_for

    return codec_for(cfg).outgoing(_initial_full(cfg))


if __name__ == "__main__":
    main()
