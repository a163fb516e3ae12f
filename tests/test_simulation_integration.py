"""A real 2-round Flower simulation on Ray with the tiny model."""

import json
import subprocess
import sys
from collections import Counter

import pytest


@pytest.mark.integration
def test_two_round_simulation_writes_run_folder(labelled_file, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--data", str(labelled_file),
        "--clients", "3", "--rounds", "2", "--local-steps", "4", "--batch-size", "4", "--learning-rate", "0.01",
        "--eval-size", "12",
        "--partition", "dirichlet:1.0", "--fraction-evaluate", "1.0", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["train_loss"] is None and rows[0]["clients"] == 0
    for row in rows[1:]:
        assert row["clients"] == 3 and row["failures"] == 0
        assert row["train_loss"] > 0 and row["eval_loss"] > 0
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert row["bytes_down"] > 0 and row["bytes_up"] > 0 and row["seconds"] > 0
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]  # the federation learned something
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final"]["eval_loss"] == rows[2]["eval_loss"]
    expected = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "curves.png"]
    expected += ["checkpoints/round-001/state.json", "checkpoints/round-002/adapter_model.safetensors"]
    for name in expected:
        assert (out / name).is_file(), name
    assert "round | held-out loss | accuracy" in proc.stderr
    assert all(0 < r["node_eval_loss"] for r in rows[1:])  # the nodes' own validation slices


def _simulate(data, out, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--data", str(data),
        "--clients", "3", "--rounds", "2", "--local-steps", "3", "--batch-size", "4", "--eval-size", "12",
        "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_simulation_svd_mixed_ranks_with_local_dp(labelled_file, tmp_path):
    out = tmp_path / "run"
    proc = _simulate(
        labelled_file, out, "--aggregation", "svd", "--client-ranks", "2,4,8", "--dp", "--noise-multiplier", "1.0",
        "--dp-seed", "1", "--global-rank", "14", "--dp-batch-size", "8", "--balance-labels",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert sorted(c["lora_rank"] for c in rows[0]["per_client"]) == [2, 4, 8]
    assert rows[0]["epsilon_max"] < rows[1]["epsilon_max"]  # cumulative across rounds on each node
    assert rows[1]["noise_multiplier"] == 1.0 and rows[1]["declined"] == 0
    assert all(r["aggregation_residual"] < 1e-5 for r in rows)  # global rank 14 = 2 + 4 + 8: exact
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["local"]["epsilon_max"] == rows[1]["epsilon_max"]
    from collections import Counter

    from fedswarm.common.data import load_examples
    from fedswarm.common.splits import holdout_split

    records = load_examples(str(labelled_file))
    held = Counter(records[i].label for i in holdout_split(len(records), 12, 0).holdout)
    assert summary["constant_answer"]["accuracy"] == max(held.values()) / 12
    assert "constant answer (always " in proc.stderr + proc.stdout
    privacy = json.loads((out / "adapter" / "privacy.json").read_text())
    assert privacy["local"]["delta"] == 1e-5 and privacy["local"]["accountant"] == "prv"
    # the guarantee is auditable: each node's figures recompute to its epsilon with Opacus called directly
    from opacus.accountants import PRVAccountant

    nodes = privacy["local"]["nodes"]
    assert len(nodes) == 3
    for figures in nodes.values():
        assert figures["steps"] == 6 and figures["max_grad_norm"] == 1.0 and figures["delta"] == 1e-5
        independent = PRVAccountant()
        assert all(set(h) == {"noise_multiplier", "sample_rate", "steps"} for h in figures["history"])
        independent.history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in figures["history"]]
        assert figures["epsilon"] == pytest.approx(independent.get_epsilon(1e-5, eps_error=0.01), rel=1e-9)
    assert max(f["epsilon"] for f in nodes.values()) == pytest.approx(rows[1]["epsilon_max"], abs=0.02)


@pytest.mark.integration
def test_simulation_ffa_with_central_dp(labelled_file, tmp_path):
    out = tmp_path / "run"
    proc = _simulate(labelled_file, out, "--aggregation", "ffa", "--central-dp", "--central-noise", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    # ffa alone is exact; here the residual measures the central clipping and noise (large: B starts at 0)
    assert all(0 < r["aggregation_residual"] < float("inf") for r in rows)
    assert 0 < rows[0]["central_epsilon"] < rows[1]["central_epsilon"]
    from fedswarm.common.lora_state import adapter_state, attach_lora
    from fedswarm.common.model import load_model

    full = sum(t.numel() * 4 for t in adapter_state(attach_lora(load_model("tiny"), 8, 16.0, 0)).values())
    assert rows[0]["bytes_up"] < 0.6 * 3 * full and rows[0]["bytes_down"] < 0.6 * 3 * full  # only B travels


@pytest.mark.integration
def test_simulation_ffa_server_lr_steps_exactly(labelled_file, tmp_path):
    out = tmp_path / "run"
    proc = _simulate(labelled_file, out, "--aggregation", "ffa", "--server-lr", "2", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    # the residual is measured against the server step from the adapter each round started from:
    # exact under ffa, and it would be ~1 (B moved twice the mean) had the step not been taken from it
    assert len(rows) == 2 and all(r["aggregation_residual"] < 1e-5 for r in rows)
    assert json.loads((out / "summary.json").read_text())["config"]["server_lr"] == 2.0


@pytest.mark.integration
def test_simulation_ffa_scaffold_sends_checkpoints_and_resumes_the_control(labelled_file, tmp_path):
    from safetensors.torch import load_file

    from fedswarm.common.lora_state import adapter_state, attach_lora
    from fedswarm.common.model import load_model

    out = tmp_path / "run"
    scaffold = ("--aggregation", "ffa", "--scaffold", "--partition", "dirichlet:0.5")
    proc = _simulate(labelled_file, out, *scaffold, "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    b_state = {k: v for k, v in adapter_state(attach_lora(load_model("tiny"), 8, 16.0, 0)).items() if "lora_B" in k}
    b_bytes = sum(t.numel() * 4 for t in b_state.values())
    control = load_file(str(out / "checkpoints/round-001/control.safetensors"))
    assert set(control) == set(b_state)  # c: one tensor per trained B, finite, not zero (the nodes' mean gradient)
    assert all(bool(t.isfinite().all()) for t in control.values())
    assert sum(float(t.abs().sum()) for t in control.values()) > 0
    assert not (out / "adapter" / "control.safetensors").exists()  # not part of the PEFT adapter
    proc = _simulate(labelled_file, out, *scaffold, "--resume", str(out), "--rounds", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["round"] for r in rows] == [1, 2]
    # round 1 sends B only; the resumed round 2 B and c, read back from round 1's checkpoint
    assert rows[1]["bytes_down"] - rows[0]["bytes_down"] > 0.95 * 3 * b_bytes
    assert all(r["bytes_up"] > 0.95 * 2 * 3 * b_bytes for r in rows)  # each reply: B and its c_i
    assert (out / "checkpoints/round-002/control.safetensors").is_file()


@pytest.mark.integration
def test_simulation_ffa_server_adam_with_fedprox_scores_the_last_round_only(labelled_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    extra = ("--aggregation", "ffa", "--server-optimizer", "adam", "--server-lr", "0.001", "--server-tau", "1e-6")
    proc = _simulate(labelled_file, out, *extra, "--proximal-mu", "0.01", "--eval-every", "0", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval_loss"] is None and rows[1]["eval_loss"] > 0  # --eval-every 0: the last round only
    summary = json.loads((out / "summary.json").read_text())
    constant = summary["constant_answer"]["accuracy"]
    assert summary["final"]["eval_margin"] == pytest.approx(rows[1]["eval_accuracy"] - constant, abs=1e-12)
    acc = rows[1]["eval_accuracy"]
    assert summary["final"]["eval_margin_se"] == pytest.approx((acc * (1 - acc) / 12) ** 0.5, abs=1e-12)
    # B starts at 0; FedAdam's first step moves each entry by lr_1 * m / (sqrt(v) + tau) with m = 0.1 delta and
    # v = 0.01 delta^2, i.e. lr_1 * sign(delta) (tau 1e-6 << |delta|): every moved entry sits at +-lr_1
    lr_1 = 0.001 * (1 - 0.99**2) ** 0.5 / (1 - 0.9**2)
    b = [t for k, t in load_file(str(out / "checkpoints/round-001/adapter_model.safetensors")).items() if "lora_B" in k]
    largest = max(float(t.abs().max()) for t in b)
    assert lr_1 * 0.99 < largest <= lr_1 * (1 + 1e-5)
    moments = load_file(str(out / "checkpoints/round-001/server_optimizer.safetensors"))
    assert {k.split("/", 1)[0] for k in moments} == {"m", "v"} and len(moments) == 2 * len(b)
    assert not (out / "adapter" / "server_optimizer.safetensors").exists()


@pytest.mark.integration
def test_simulation_samples_nodes_and_each_accounts_only_the_rounds_it_trained(labelled_file, tmp_path):
    """3 nodes, 1 sampled per round over 3 rounds, under local DP: every round trains one node, the
    metrics name it, and each node's DP history holds one composition of 3 steps per round it trained
    (its accountant sat out the other rounds unchanged)."""
    out = tmp_path / "run"
    proc = _simulate(
        labelled_file, out, "--rounds", "3", "--clients-per-round", "1", "--aggregation", "ffa", "--dp",
        "--noise-multiplier", "1.0", "--dp-seed", "1", "--dp-batch-size", "8", "--eval-every", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [len(r["sampled"]) for r in rows] == [1, 1, 1]
    assert all([c["node"] for c in r["per_client"]] == r["sampled"] for r in rows)
    trained = Counter(r["sampled"][0] for r in rows)
    nodes = json.loads((out / "summary.json").read_text())["privacy"]["local"]["nodes"]
    assert {int(n): f["steps"] for n, f in nodes.items()} == {n: 3 * k for n, k in trained.items()}
    assert sum(trained.values()) == 3
