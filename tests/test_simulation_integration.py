"""A real 2-round Flower simulation on Ray with the tiny model."""

import json
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_two_round_simulation_writes_run_folder(labelled_file, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--data", str(labelled_file),
        "--clients", "3", "--rounds", "2", "--local-steps", "4", "--batch-size", "4", "--learning-rate", "0.01",
        "--eval-size", "12",
        "--partition", "dirichlet:1.0", "--out", str(out),
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
    ray_left = subprocess.run(["pgrep", "-f", "ray::"], capture_output=True, text=True).stdout.strip()
    assert ray_left == "", f"Ray workers left running: {ray_left}"
