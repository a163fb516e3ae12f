"""A simulation on a two-node Ray cluster started with Ray's own CLI (head + worker, 127.0.0.1)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    handle = log.open("w")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop one ``ray start --block`` and everything it started (its own process group only)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture()
def ray_cluster(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block"]
    head_args = ["--head", "--port", str(port), "--include-dashboard", "false"]
    head = _start([RAY, "start", *head_args, "--node-ip-address", "127.0.0.1", *common], tmp_path / "head.log")
    procs = [head]
    try:
        _wait_for(lambda: _nodes(address) >= 1, 90, tmp_path / "head.log", head)
        worker = _start([RAY, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
                        tmp_path / "worker.log")  # fmt: skip
        procs.append(worker)
        _wait_for(lambda: _nodes(address) >= 2, 90, tmp_path / "worker.log", worker)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray stop` would remove it
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _nodes(address: str) -> int:
    code = (
        "import ray,sys;ray.init(address=sys.argv[1],logging_level='ERROR');"
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def _wait_for(check, seconds: float, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
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
        "--ray-address", ray_cluster, "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["clients"] for r in rows] == [4, 4]
    nodes = {c["ray_node"] for r in rows for c in r["per_client"]}
    assert len(nodes) == 2, f"clients ran on {nodes}"
    assert f"the Ray cluster at {ray_cluster}" in proc.stderr
