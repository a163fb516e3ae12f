"""The round loop against nodes that fail: errors, silence and malformed updates (an in-process Grid).

A fake Grid answers for three nodes, each with a behaviour: a good update, an error
reply, no reply at all, or an update holding NaN. The coordinator's real round loop
runs against it with the tiny model.
"""

import json

import pytest
import torch
from flwr.app import Error, Message, MetricRecord, RecordDict

from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import from_record, to_record
from fedswarm.common.errors import FedswarmError

pytestmark = pytest.mark.usefixtures("flower_task")  # replies are stamped as a node's


class FakeGrid:
    """Flower's Grid surface the coordinator uses; node ``n`` answers as ``behaviour[n]`` says."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour
        self.pending: dict[str, Message] = {}
        self.count = 0

    def get_node_ids(self):
        return list(self.behaviour)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"  # the SuperLink's job
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        replies = []
        for mid in ids:
            msg = self.pending[mid]
            kind = self.behaviour[msg.metadata.dst_node_id]
            if kind == "silent":
                continue
            del self.pending[mid]
            if kind == "error":
                replies.append(Message(Error(code=0, reason="ClientApp raised an exception"), reply_to=msg))
                continue
            state = from_record(msg.content["arrays"])
            state = {k: v + 0.01 if "lora_B" in k else v for k, v in state.items()}
            if kind == "nan":
                state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
            metrics = {"num-examples": 10, "train-loss": 1.0, "steps": 1, "seconds": 0.1, "peak-rss-mb": 1.0}
            content = RecordDict({"metrics": MetricRecord({**metrics, "lora-rank": 4})})
            content["arrays"] = to_record(state)
            replies.append(Message(content, reply_to=msg))
        return replies


def _cfg(labelled_file, tmp_path, **extra) -> FederationConfig:
    settings = dict(
        model="tiny", data=str(labelled_file), clients=3, rounds=2, lora_rank=4, lora_alpha=8.0, eval_size=12,
        round_timeout=1.0, out=str(tmp_path / "run"),
    )  # fmt: skip
    return FederationConfig(**{**settings, **extra})


def _rows(tmp_path):
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_rounds_go_on_with_min_clients_and_count_failures_and_rejections(labelled_file, tmp_path, monkeypatch):
    from fedswarm.server.coordinator import federation

    monkeypatch.setattr(federation, "NODE_WAIT_SECONDS", 1.0)
    grid = FakeGrid({1: "good", 2: "nan", 3: "error", 4: "silent"})
    federation.run_federation(grid, _cfg(labelled_file, tmp_path, clients=4, min_clients=1))
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == 1 and row["rejected"] == 1 and row["failures"] == 2
        assert row["rejected_why"][0].startswith("node 2:") and "NaN or Inf" in row["rejected_why"][0]
        assert any("node 3" in why and "exception" in why for why in row["failed_why"])
        assert any("no reply within 1 s" in why for why in row["failed_why"])
        assert [c["node"] for c in row["per_client"]] == [1]
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert all(torch.allclose(v, torch.full_like(v, 0.02)) for v in b)  # node 1's two updates, nothing of node 2's NaN


def test_a_round_without_enough_usable_replies_stops_before_its_checkpoint(labelled_file, tmp_path, monkeypatch):
    from fedswarm.server.coordinator import federation

    monkeypatch.setattr(federation, "NODE_WAIT_SECONDS", 1.0)
    grid = FakeGrid({1: "good", 2: "nan", 3: "silent"})
    with pytest.raises(FedswarmError, match="round 1: 1 usable replies, the round needs 2"):
        federation.run_federation(grid, _cfg(labelled_file, tmp_path, min_clients=2))
    assert [r["round"] for r in _rows(tmp_path)] == [0]
    assert not (tmp_path / "run" / "checkpoints" / "round-001").exists()


def test_too_few_nodes_online_is_a_one_line_error(labelled_file, tmp_path, monkeypatch):
    from fedswarm.server.coordinator import federation

    monkeypatch.setattr(federation, "NODE_WAIT_SECONDS", 0.5)
    with pytest.raises(FedswarmError, match="only 1 client nodes connected within 0 s; the run needs 3"):
        federation.run_federation(FakeGrid({1: "good"}), _cfg(labelled_file, tmp_path))
