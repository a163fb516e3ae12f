"""One held-out split and one partitioning for the whole system, and nodes sent only node-side settings.

The coordinator evaluates on the split's held-out side; simulated nodes train on partitions of
the rest; a deployed node holding the same records slices them as a simulated node does; the
edge export's parity check reads its held-out texts from the same split.
"""

import json
from dataclasses import asdict, fields

from fedswarm.client.edge.merge import RunInfo
from fedswarm.client.edge.parity import held_out_texts
from fedswarm.client.trainer.runtime import local_shard, simulated_shard
from fedswarm.common.batches import encode
from fedswarm.common.config import (
    CoordinatorSettings,
    FederationConfig,
    NodeConfig,
    SimulationSettings,
    from_run_config,
    run_key,
)
from fedswarm.common.model import load_tokenizer
from fedswarm.server.coordinator.central_eval import CentralEvaluator
from fedswarm.server.coordinator.round_plan import round_config

NODES = 4


def _key(example) -> str:
    return json.dumps([example.messages, example.answer])


def test_coordinator_nodes_and_parity_share_one_split(labelled_file, tmp_path):
    cfg = FederationConfig(model="tiny", data=str(labelled_file), eval_size=20, partition="dirichlet:0.5", seed=3)
    holdout = CentralEvaluator(cfg).holdout
    assert len(holdout) == 20
    shards = [simulated_shard({"partition-id": p, "num-partitions": NODES}, cfg, cfg.data) for p in range(NODES)]
    trained = [_key(e) for s in shards for e in s.train + s.validation]
    held = {_key(e) for e in holdout}
    assert held.isdisjoint(trained)  # never trained on
    assert len(trained) == len(set(trained)) == 120 - 20  # the nodes share the rest, each record once

    # a deployed node whose file holds simulated node 1's records slices them exactly as node 1 does
    assert shards[1].train and shards[1].validation
    path = tmp_path / "node1.jsonl"
    path.write_text(
        "".join(
            json.dumps({"input": [{"role": r, "content": c} for r, c in e.messages], "ideal": e.answer}) + "\n"
            for e in shards[1].validation + shards[1].train
        )
    )
    deployed = local_shard(str(path), cfg)
    assert [_key(e) for e in deployed.validation] == [_key(e) for e in shards[1].validation]
    assert [_key(e) for e in deployed.train] == [_key(e) for e in shards[1].train]

    # the edge parity check's held-out texts are the coordinator's held-out examples, in order
    tokenizer = load_tokenizer("tiny")
    run = RunInfo(None, {"config": asdict(cfg)})
    texts = held_out_texts(tokenizer, run, samples=8, max_len=cfg.max_seq_len)
    assert texts == [list(encode(tokenizer, e, cfg.max_seq_len).input_ids) for e in holdout[:8]]


def test_nodes_receive_no_coordinator_setting(tmp_path):
    cfg = FederationConfig(data=str(tmp_path / "pool.jsonl"), out=str(tmp_path / "run"), resume=str(tmp_path / "r"))
    sent = dict(round_config(cfg, 3))
    assert sent["server-round"] == 3
    assert {run_key(f.name) for f in (*fields(CoordinatorSettings), *fields(SimulationSettings))}.isdisjoint(sent)
    assert not [v for v in sent.values() if isinstance(v, str) and str(tmp_path) in v]  # no path of the coordinator
    # a simulation's virtual nodes (on the coordinator's machine) are sent the pool they partition
    assert dict(round_config(cfg, 3, simulated=True)) == {**sent, "pool": cfg.data}
    # and everything a node needs is there: the node rebuilds the same training settings
    node_cfg = NodeConfig(**{f.name: getattr(cfg, f.name) for f in fields(NodeConfig)})
    assert from_run_config(NodeConfig, sent) == node_cfg
    assert {run_key(f.name) for f in fields(NodeConfig)} == set(sent) - {"server-round"}  # and nothing else
