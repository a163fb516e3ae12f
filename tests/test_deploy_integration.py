"""A real deployment on 127.0.0.1: a SuperLink with TLS and node authentication, two SuperNodes.

Everything goes through the ``fedswarm`` commands (certs, node-key, coordinator, node, run),
which run Flower's own processes. One deployment serves the tests of this module, in order:
an unregistered node is refused; two rounds complete; a coordinator stopped after round 1
resumes round 2 from its checkpoint (compared with the uninterrupted run); a node killed
during a round leaves a round that completes with the other one.

The nodes are warm (``fedswarm node``'s default): one worker per node runs every message in
one process, and no ``flwr-clientapp`` process is ever started (checked while the rounds run).
Two nodes, not more, on a 2-core CI machine.
"""

from __future__ import annotations

import shutil
import ssl
import time

import pytest

from tests.conftest import assert_no_leftovers, write_jsonl
from tests.deploy_support import NODES, Deployment
from tests.deploy_support import records as _records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from fedswarm.common.cli import main
    from fedswarm.common.processes import free_port

    root = tmp_path_factory.mktemp("deploy")
    assert main(["certs", "--out", str(root / "certs"), "--host", "127.0.0.1"]) == 0
    (root / "auth").mkdir()
    for name in [f"n{i}" for i in range(NODES)] + ["rogue"]:
        assert main(["node-key", "--out", str(root / "keys"), "--name", name]) == 0
        if name != "rogue":
            shutil.copy(root / "keys" / f"{name}.pub", root / "auth")
    for i in range(NODES):  # each node its own file; the coordinator its own held-out file
        write_jsonl(root / f"node{i}.jsonl", _records(100 * i, 24))
    write_jsonl(root / "held.jsonl", _records(1000, 24))
    dep = Deployment(root, free_port())
    try:
        dep.start_coordinator()
        dep.wait_for_log("coordinator", "registered node key", NODES)
        for i in range(NODES):
            dep.start_node(i)
        yield dep
    finally:
        dep.sup.stop_all()
    assert_no_leftovers(dep.sup)  # every process of every tree, by pid and creation time, orphans included


def test_unregistered_node_is_refused(deployment):
    rogue = deployment.run(*deployment.node_args("rogue", deployment.root / "node0.jsonl"), timeout=120)
    assert rogue.returncode == 2, rogue.stdout[-2000:] + rogue.stderr[-2000:]
    assert "refused this node" in rogue.stderr
    # the SuperLink speaks TLS only, with the certificate of our CA
    pem = ssl.get_server_certificate(("127.0.0.1", deployment.port))
    assert "BEGIN CERTIFICATE" in pem


DP = ("--dp", "--noise-multiplier", "1.0", "--dp-seed", "1")  # seeded noise: a resumed run can equal this one


class ProcessWatch:
    """Samples the nodes' process trees while a run goes on: every command line seen."""

    def __init__(self, deployment: Deployment) -> None:
        import threading

        self.deployment, self.seen, self.stop = deployment, set(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.is_set():
            for node in self.deployment.nodes.values():
                self.seen.update(_cmdline(p) for p in self.deployment.sup.tree(node))
            self.stop.wait(0.1)

    def __enter__(self) -> ProcessWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_two_rounds_over_tls_with_node_auth(deployment):
    with ProcessWatch(deployment) as watch:
        done = deployment.run(*deployment.run_args("full", *DP))
    assert len([c for c in watch.seen if "fedswarm.client.trainer.warm" in c]) == NODES  # one warm worker per node
    assert not [c for c in watch.seen if "flwr-clientapp" in c]  # no per-message ClientApp process, any round
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "$ flwr run" in done.stdout and "completed" in done.stdout
    rows = deployment.metrics("full")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == NODES and row["failures"] == 0 and row["rejected"] == 0
        assert row["train_loss"] > 0 and row["bytes_up"] > 0
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    assert 0 < rows[1]["epsilon_max"] < rows[2]["epsilon_max"]  # each node's epsilon accumulates
    full = deployment.runs / "full"
    assert (full / "adapter" / "adapter_model.safetensors").is_file()
    assert (full / "checkpoints" / "round-002" / "state.json").is_file()
    # the nodes' data paths never reach the coordinator
    written = "".join(p.read_text(errors="replace") for p in full.rglob("*.json*"))
    assert "node0.jsonl" not in written and "node1.jsonl" not in written


def test_coordinator_stopped_after_round_one_resumes_round_two(deployment):
    runner = deployment.start("run-interrupted", *deployment.run_args("interrupted", *DP))
    deadline = time.monotonic() + 300
    while not any(r["round"] == 1 for r in deployment.metrics("interrupted")):
        assert time.monotonic() < deadline and runner.poll() is None, deployment.log("run-interrupted")[-3000:]
        time.sleep(0.5)
    deployment.sup.stop(deployment.coordinator)  # SuperLink, its ServerApp and SuperExec go down mid-run
    deployment.sup.stop(runner)
    assert [r["round"] for r in deployment.metrics("interrupted")] == [0, 1]
    deployment.start_coordinator()  # same port, same run dir and SuperLink database: same node ids
    deployment.wait_for_log("coordinator", "coordinator listening", count=2)
    resumed = deployment.run(
        "run", "--federation", "local", "--flwr-home", str(deployment.root / "flwr"), "--resume", "interrupted"
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    rows = deployment.metrics("interrupted")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["clients"] == NODES
    from safetensors.torch import load_file

    a = load_file(str(deployment.runs / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(deployment.runs / "interrupted" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed vs uninterrupted: max |adapter difference| = {diff:.3e}")
    assert diff < 1e-5
    full = deployment.metrics("full")
    assert abs(rows[2]["eval_loss"] - full[2]["eval_loss"]) < 1e-4
    # privacy accounting went on from the checkpoint's per-node histories (the nodes' own state was per run)
    assert rows[2]["epsilon_max"] == pytest.approx(full[2]["epsilon_max"], rel=1e-9)
    assert rows[2]["epsilon_max"] > rows[1]["epsilon_max"]


def _cmdline(proc) -> str:
    """A process's command line, or "" once it has exited (it may turn zombie at any moment)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def test_worker_killed_mid_task_fails_that_reply_and_is_restarted(deployment):
    import psutil

    runner = deployment.start(
        "run-worker", *deployment.run_args("worker", "--min-clients", "1", "--round-timeout", "150")
    )
    started = deployment.log("node0").count("train message of run")
    deadline = time.monotonic() + 200
    while deployment.log("node0").count("train message of run") == started:
        assert time.monotonic() < deadline and runner.poll() is None, deployment.log("run-worker")[-3000:]
        time.sleep(0.2)
    workers = [p for p in deployment.sup.tree(deployment.nodes[0]) if "fedswarm.client.trainer.warm" in _cmdline(p)]
    assert len(workers) == 1
    workers[0].send_signal(9)  # the worker dies mid-task; its SuperNode stays up
    psutil.wait_procs(workers, timeout=10)
    assert runner.wait(timeout=300) == 0, deployment.log("run-worker")[-3000:]
    rows = deployment.metrics("worker")
    assert [r["round"] for r in rows] == [0, 1, 2]
    # round 1: the restarted worker answers the dead one's task with Flower's crash error (its log says so below),
    # not the round's timeout
    assert rows[1]["clients"] == 1 and rows[1]["failures"] == 1, rows[1]
    assert "stopped responding" in rows[1]["failed_why"][0], rows[1]
    assert rows[2]["clients"] == NODES and rows[2]["failures"] == 0, rows[2]  # round 2: a restarted worker trained
    assert "the warm worker exited with code -9; restarting it" in deployment.log("node0")
    assert "answered the task of run" in deployment.log("node0")


def test_node_killed_during_a_round_leaves_the_round_to_the_others(deployment):
    # The round ends when node 0 has replied and Flower has noticed the dead node (2 missed 30 s heartbeats: an
    # error reply, "Node Unavailable"), not at a timeout tuned to this machine's speed: run_args' 240 s only bounds it.
    runner = deployment.start("run-dropout", *deployment.run_args("dropout", "--rounds", "1", "--min-clients", "1"))
    victim = deployment.nodes[1]
    started = deployment.log("node1").count("train message of run")
    deadline = time.monotonic() + 200
    while deployment.log("node1").count("train message of run") == started:  # the warm worker took the task
        assert time.monotonic() < deadline and runner.poll() is None, deployment.log("run-dropout")[-3000:]
        time.sleep(0.2)
    deployment.sup.kill(victim)  # training has started on node 1: SIGKILL it, SuperNode, worker and all
    assert runner.wait(timeout=300) == 0, deployment.log("run-dropout")[-3000:]
    rows = deployment.metrics("dropout")
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 1 and rows[1]["failures"] == 1, rows[1]
    assert rows[1]["failed_why"] and rows[1]["seconds"] > 0
