import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedswarm.common.codecs import codec_for
from fedswarm.common.config import FederationConfig
from fedswarm.server.coordinator.round_plan import NodeBook
from fedswarm.server.coordinator.strategy import LoraStrategy

pytestmark = pytest.mark.usefixtures("flower_task")  # replies are stamped as a node's


def _reply(arrays: dict[str, np.ndarray], examples: int, loss: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(_as_torch(arrays)),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def _as_torch(arrays):
    import torch

    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def test_fedavg_is_the_weighted_mean_of_lora_arrays():
    rng = np.random.default_rng(0)
    shapes = {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (16, 4)}
    clients = [({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, n) for n in (10, 30, 60)]
    replies = [_reply(a, n, loss) for (a, n), loss in zip(clients, (1.0, 2.0, 4.0), strict=True)]
    codec = codec_for(FederationConfig(clients=3))
    strategy = LoraStrategy(codec, NodeBook(), clients=3, min_clients=3, node_wait=1.0)
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    for key in shapes:  # by hand: (10*x1 + 30*x2 + 60*x3) / 100
        expected = (10 * clients[0][0][key] + 30 * clients[1][0][key] + 60 * clients[2][0][key]) / 100
        np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert abs(metrics["train-loss"] - (10 * 1 + 30 * 2 + 60 * 4) / 100) < 1e-9
