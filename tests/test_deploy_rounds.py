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
            step = 0.01 * (msg.metadata.dst_node_id if kind == "own" else 1)  # "own": a node's own update size
            state = {k: v + step if "lora_B" in k else v for k, v in state.items()}
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


def _b_values(tmp_path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    return [v for k, v in adapter.items() if "lora_B" in k]


def test_sampled_rounds_are_drawn_with_the_seed_and_the_same_after_resume(labelled_file, tmp_path, monkeypatch):
    from fedswarm.server.coordinator import federation

    monkeypatch.setattr(federation, "NODE_WAIT_SECONDS", 1.0)
    nodes = {n: "good" for n in range(1, 7)}
    settings = dict(clients=6, clients_per_round=2, rounds=3, eval_every=0)
    federation.run_federation(FakeGrid(nodes), _cfg(labelled_file, tmp_path / "a", **settings))
    full = [r["sampled"] for r in _rows(tmp_path / "a")[1:]]
    assert all(len(s) == 2 and set(s) <= set(nodes) for s in full)
    assert len({tuple(s) for s in full}) > 1  # a fresh draw each round
    assert all(r["clients"] == 2 and r["late"] == 0 for r in _rows(tmp_path / "a")[1:])
    # the same seed draws the same nodes; a resumed run draws round 3 as the uninterrupted one did
    federation.run_federation(FakeGrid(nodes), _cfg(labelled_file, tmp_path / "b", **{**settings, "rounds": 2}))
    resumed = _cfg(labelled_file, tmp_path / "b", **settings, resume=str(tmp_path / "b" / "run"), resume_given="rounds")
    federation.run_federation(FakeGrid(nodes), resumed)
    assert [r["sampled"] for r in _rows(tmp_path / "b")[1:]] == full
    # another seed, another draw
    federation.run_federation(FakeGrid(nodes), _cfg(labelled_file, tmp_path / "c", **settings, seed=1))
    assert [r["sampled"] for r in _rows(tmp_path / "c")[1:]] != full


def test_an_over_selected_round_closes_on_the_first_k_good_replies(labelled_file, tmp_path, monkeypatch):
    """5 nodes sampled for K = 3 (over-select 5/3): node 3 sends NaN, node 4 never answers. The round
    closes once nodes 1, 2 and 5 have answered well, not at its timeout: node 4 is late, not failed, and the
    adapter is exactly the mean of those three updates (B moved 0.01 x node id by each)."""
    from fedswarm.server.coordinator import federation

    monkeypatch.setattr(federation, "NODE_WAIT_SECONDS", 1.0)
    grid = FakeGrid({1: "own", 2: "own", 3: "nan", 4: "silent", 5: "own"})
    cfg = _cfg(
        labelled_file, tmp_path, clients=5, clients_per_round=3, over_select=5 / 3, rounds=1, round_timeout=3600.0
    )
    assert cfg.sampled_per_round() == 5
    federation.run_federation(grid, cfg)
    row = _rows(tmp_path)[1]
    assert row["sampled"] == [1, 2, 3, 4, 5] and row["failures"] == 0
    assert row["clients"] == 3 and [c["node"] for c in row["per_client"]] == [1, 2, 5]
    # replies are pulled in no set order: node 3's NaN is either screened out (rejected) or still unread when the
    # third good reply closes the round (late); node 4's silence is always late
    assert row["late"] + row["rejected"] == 2 and row["late"] >= 1
    assert all(why.startswith("node 3:") for why in row["rejected_why"])
    expected = (0.01 * 1 + 0.01 * 2 + 0.01 * 5) / 3  # equal weights (10 examples each)
    tol = 8 * torch.finfo(torch.float32).eps * expected  # three float32 additions and a division
    assert all(torch.allclose(v, torch.full_like(v, expected), rtol=0, atol=tol) for v in _b_values(tmp_path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"clients_per_round": 5}, r"^--clients-per-round must be within \[0, --clients=4\], got 5$"),
        ({"over_select": 1.5}, r"^--over-select needs --clients-per-round"),
        ({"clients_per_round": 2, "over_select": 0.5}, r"^--over-select must be >= 1, got 0.5$"),
        (
            {"clients_per_round": 2, "min_clients": 3},
            r"^--min-clients must be within \[0, --clients-per-round=2\], got 3$",
        ),
    ],
)
def test_sampling_settings_are_checked_in_one_line(extra, message):
    from fedswarm.common.errors import InputError

    with pytest.raises(InputError, match=message):
        FederationConfig(clients=4, **extra)
