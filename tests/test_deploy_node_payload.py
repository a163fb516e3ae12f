"""What a deployed node sends back: adapter tensors and scalar metrics, nothing derived from its data.

The ClientApp's train handler runs as a deployed SuperNode runs it (``data-path`` in the
node config), and every record of its reply is inspected.
"""

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import from_record, is_packed, to_record

pytestmark = pytest.mark.usefixtures("flower_task")  # replies are stamped as a node's

SECRET = "zebra-quartz-7781"  # appears in the node's data only


@pytest.fixture()
def node_file(tmp_path):
    from tests.conftest import write_jsonl

    records = [
        {"input": [{"role": "user", "content": f"{SECRET} is {i} odd?"}], "ideal": "yes" if i % 2 else "no"}
        for i in range(24)
    ]
    return write_jsonl(tmp_path / "node.jsonl", records)


def _train_message(cfg: FederationConfig, packed: bool = True):
    from fedswarm.common.lora_state import adapter_state, attach_lora
    from fedswarm.common.model import load_model

    state = adapter_state(attach_lora(load_model(cfg.model), cfg.lora_rank, cfg.lora_alpha, cfg.seed))
    config = ConfigRecord({**cfg.to_run_config(), "server-round": 1})
    content = RecordDict({"arrays": to_record(state, packed=packed), "config": config})
    return Message(content=content, dst_node_id=5, message_type="train"), state


@pytest.mark.processes
@pytest.mark.parametrize("dp,packed", [(False, True), (True, True), (False, False)])
def test_a_node_sends_only_adapter_tensors_and_scalars(node_file, dp, packed):
    from fedswarm.client.trainer.app import train

    cfg = FederationConfig(
        model="tiny", clients=3, local_steps=2, batch_size=4, lora_rank=4, lora_alpha=8.0, dp=dp,
        noise_multiplier=1.0 if dp else 0.0, dp_seed=3,
    )  # fmt: skip
    msg, sent = _train_message(cfg, packed)
    context = Context(run_id=1, node_id=5, node_config={"data-path": str(node_file)}, state=RecordDict(), run_config={})
    reply = train(msg, context)
    content = reply.content

    expected_records = {"arrays", "metrics"} | ({"privacy"} if dp else set())
    assert set(content.keys()) - {"node-info"} == expected_records
    # the adapter: exactly the LoRA tensors it was sent, same shapes
    arrays = content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    assert is_packed(arrays) == packed  # as it was sent: Flower's central-DP strategy sends one Array per tensor
    got = from_record(arrays)
    assert set(got) == set(sent) and all("lora_" in k for k in got)
    assert all(got[k].shape == sent[k].shape for k in got)
    # metrics: scalars only (a MetricRecord also admits lists: none here)
    metrics = content["metrics"]
    assert isinstance(metrics, MetricRecord)
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()), dict(metrics)
    assert metrics["num-examples"] > 0
    # where the node ran (host, device): no data, no path
    if "node-info" in content:
        info = dict(content["node-info"])
        assert set(info) <= {"host", "device", "ray-node"}, info
    if dp:  # the DP accountant history: a JSON list of (sigma, q, steps), and a note
        privacy = dict(content["privacy"])
        assert set(privacy) == {"history", "note"}
        history = json.loads(privacy["history"])
        assert all(len(h) == 3 and all(isinstance(x, int | float) for x in h) for h in history)
        assert history[0][2] == cfg.local_steps
    # nothing of the node's data or its location leaves: no text, no path, no token ids
    for name, record in content.items():
        if isinstance(record, ConfigRecord):
            text = json.dumps({k: v for k, v in record.items()}, default=str)
            assert SECRET not in text and str(node_file) not in text and "node.jsonl" not in text, name
