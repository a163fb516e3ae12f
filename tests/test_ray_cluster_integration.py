"""A simulation on a two-node Ray cluster started with Ray's own CLI (head + worker, 127.0.0.1)."""

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from fedswarm.common.processes import Supervisor, free_port
from tests.conftest import assert_no_leftovers

RAY = str(Path(sys.executable).with_name("ray"))


class RayCluster(NamedTuple):
    address: str
    sup: Supervisor  # what started the cluster: the test's own processes go through it too


def _start(sup: Supervisor, args: list[str], log: Path) -> str:
    """``ray start ARGS --block`` (SIGTERM stops it and the Ray processes it started); its name in ``sup``."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    with log.open("w") as handle:
        sup.start(log.stem, args, env, output=handle, quiet=True)
    return log.stem


@pytest.fixture()
def ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block"]
    head_args = ["--head", "--port", str(port), "--include-dashboard", "false"]
    sup = Supervisor(grace=30.0)
    try:
        head = _start(sup, [RAY, "start", *head_args, "--node-ip-address", "127.0.0.1", *common], tmp_path / "head.log")
        _wait_for(lambda: _nodes(sup, address) >= 1, 90, tmp_path / "head.log", sup, head)
        worker = _start(sup, [RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
                        tmp_path / "worker.log")  # fmt: skip
        _wait_for(lambda: _nodes(sup, address) >= 2, 90, tmp_path / "worker.log", sup, worker)
        yield RayCluster(address, sup)
    finally:
        sup.stop_all()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray stop` would remove it
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    assert_no_leftovers(sup)  # Ray's raylets, GCS and workers included, by pid and creation time


def _nodes(sup: Supervisor, address: str) -> int:
    code = (
        "import ray,sys;ray.init(address=sys.argv[1],logging_level='ERROR');"
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    out = sup.run("ray nodes", [sys.executable, "-c", code, address], timeout=60)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def _wait_for(check, seconds: float, log: Path, sup: Supervisor, name: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sup.running(name):
        if check():
            return
        time.sleep(2)
    raise AssertionError(f"Ray did not come up: {log.read_text()[-2000:]}")


@pytest.mark.integration
def test_simulation_spreads_clients_over_two_ray_nodes(ray_cluster, labelled_file, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--data", str(labelled_file),
        "--clients", "4", "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--eval-size", "12",
        "--ray-address", ray_cluster.address, "--out", str(out),
    ]  # fmt: skip
    proc = ray_cluster.sup.run("simulate", cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["clients"] for r in rows] == [4, 4]
    nodes = {c["ray_node"] for r in rows for c in r["per_client"]}
    assert len(nodes) == 2, f"clients ran on {nodes}"
    assert f"the Ray cluster at {ray_cluster.address}" in proc.stderr
