"""Peak RSS per round of one training process that keeps the model (a warm node, a Ray actor).

Runs fedswarm's ClientApp in this process for ``--rounds`` train messages of one simulated
node, the way a warm worker or a Ray actor does, and prints each round's peak and final
resident memory (the reply's ``peak-rss-mb``: VmHWM reset at every message). Goal (issue 15):
every round under 2.5 GB on the default model, flat from round 2 on. ``--nodes N`` serves N
virtual nodes in turn every round, as a Ray actor of a simulation does (one warm node serves one).

    .venv/bin/python bench/node_memory.py [--model smollm2-135m] [--rounds 5] [--dp] [--nodes 4]
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
    parser.add_argument(
        "--nodes", type=int, default=1, help="virtual nodes this process serves in turn (a Ray actor's case)"
    )
    args = parser.parse_args()
    extra = {"dp": True, "epsilon": 8.0} if args.dp else {}
    cfg = FederationConfig(model=args.model, aggregation=args.aggregation, rounds=args.rounds, **extra)
    print(f"{args.model}, {cfg.aggregation}, {cfg.local_steps} steps x batch {cfg.batch_size}, dp={cfg.dp}, "
          f"torch threads {torch.get_num_threads()}, RSS at start {rss_mb():.0f} MB")  # fmt: skip
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    parts = max(4, args.nodes)
    contexts = [
        Context(1, n, {"partition-id": n, "num-partitions": parts}, RecordDict(), {}) for n in range(args.nodes)
    ]
    state: dict | None = None
    _initial_full(cfg)  # loads the model (a node does it in its first message)
    print(f"loading the model: peak RSS {peak_rss_mb():.0f} MB, RSS after {rss_mb():.0f} MB")
    print("round | node | peak RSS MB | RSS after MB | seconds")
    for round_no in range(1, args.rounds + 1):
        arrays = state if state is not None else {}
        content = RecordDict({"config": round_config(cfg, round_no, simulated=True)})
        if arrays:
            content["arrays"] = to_record(codec_for(cfg).outgoing(arrays))
        else:  # round 1: the seeded adapter, packed, as the coordinator sends it
            content["arrays"] = to_record(_initial(cfg))
        for node, context in enumerate(contexts):
            started = time.perf_counter()
            message = Message(content=content, dst_node_id=node, message_type="train")
            reply = app(message=message, context=context)
            assert not reply.has_error(), reply.error.reason
            metrics = reply.content["metrics"]
            print(f"{round_no:>5} | {node:>4} | {number(metrics, Reply.PEAK_RSS_MB):11.0f} | {rss_mb():12.0f} | "
                  f"{time.perf_counter() - started:7.1f}", flush=True)  # fmt: skip
        state = {**(state or _initial_full(cfg)), **arrays_of(reply.content)}


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
