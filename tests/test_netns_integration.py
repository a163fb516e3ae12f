"""Separate hosts for real: the coordinator and each node in a Linux network namespace of its own.

A bridge in a namespace of its own joins the hosts (a veth pair each), every host with its own
10.x address and nothing else: a node reaches the coordinator only at the address it dials,
never through 127.0.0.1. The coordinator's certificate is issued for that address. Its
interface has a second address the certificate does not name; a node dialling that one,
registered key and all, is refused at the TLS handshake and never joins. Two nodes then
complete two rounds with a run submitted from one of their hosts.

Every process goes through the deployment's ``Supervisor`` (``ip netns exec NS ...``); the
namespaces, and with them every link, are deleted at the end, also on failure. Where network
namespaces cannot be made (no permission), the tests skip, saying why.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time

import pytest

from fedswarm.common.processes import Supervisor, flower_env, flower_tool
from tests.conftest import assert_no_leftovers, write_jsonl
from tests.deploy_support import NODES, Deployment, records

pytestmark = pytest.mark.integration

SUBNET = "10.77.0"
COORDINATOR = f"{SUBNET}.1"  # the address nodes dial, in the certificate
UNCOVERED = f"{SUBNET}.2"  # the coordinator's too, on the same interface, not in the certificate
HOSTS = {
    "coordinator": [COORDINATOR, UNCOVERED],
    **{f"node{i}": [f"{SUBNET}.{10 + i}"] for i in range(NODES)},
    "stray": [f"{SUBNET}.20"],  # a registered node that dials UNCOVERED
}
PLACES = {"run": "node0"}  # `fedswarm run` is submitted from a node's host; every other process runs on its own
PORT = 9092  # each host has its own ports
REFUSAL_BOUND_S = 90.0  # a refused node says why and stops within this


class Network:
    """One network namespace per host (``PREFIX-ROLE``), joined by a bridge in ``PREFIX-switch``.

    A host's one interface, ``eth0``, holds its addresses; its veth peer is a port of the bridge.
    ``close`` deletes every namespace made, and with them their links.
    """

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.prefix = f"fsw{secrets.token_hex(3)}"  # several runs of this test may share a machine
        self.made: list[str] = []

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return self.sup.run("ip", ["ip", *args], timeout=30.0)

    def must(self, *args: str) -> None:
        done = self.ip(*args)
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def namespace(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def exec(self, role: str) -> list[str]:
        """The command prefix that runs a process on ``role``'s host."""
        return ["ip", "netns", "exec", self.namespace(role)]

    def add_switch(self) -> str | None:
        """The bridge's namespace; the reason if namespaces cannot be made here."""
        name = self.namespace("switch")
        self.made.append(name)
        made = self.ip("netns", "add", name)
        if made.returncode:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        self.must("-n", name, "link", "add", "br0", "type", "bridge")
        self.must("-n", name, "link", "set", "br0", "up")
        return None

    def add_host(self, role: str, addresses: list[str]) -> None:
        host, switch = self.namespace(role), self.namespace("switch")
        self.made.append(host)
        self.must("netns", "add", host)
        self.must("-n", host, "link", "set", "lo", "up")
        self.must("-n", switch, "link", "add", role, "type", "veth", "peer", "name", "eth0", "netns", host)
        self.must("-n", switch, "link", "set", role, "master", "br0", "up")
        for address in addresses:
            self.must("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
        self.must("-n", host, "link", "set", "eth0", "up")

    def close(self) -> list[str]:
        """Delete the namespaces made (their processes stopped first); those still listed after (none)."""
        for name in reversed(self.made):
            self.ip("netns", "del", name)
        listed = self.ip("netns", "list").stdout.splitlines()
        return [name for name in self.made if name in {line.split()[0] for line in listed if line.strip()}]


def _node_ids(coordinator_log: str) -> dict[str, int]:
    """Key name -> node id, from the coordinator's registration lines."""
    return {m[1]: int(m[2]) for m in re.finditer(r"registered node key (\S+)\.pub: node id (\d+)", coordinator_log)}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    from fedswarm.common.cli import main

    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make network namespaces with")
    root = tmp_path_factory.mktemp("netns")
    roles = {role: PLACES.get(role, role) for role in [*HOSTS, *PLACES]}
    dep = Deployment(root, PORT, address=COORDINATOR, listen="0.0.0.0")
    dep.env.update(NO_PROXY="*", no_proxy="*")  # hosts reach each other directly, never through a proxy
    net = Network(dep.sup)  # one supervisor for every process: `ip` calls and fedswarm commands
    dep.place = lambda name: net.exec(roles[name])
    left: list[str] = []
    try:
        if why := net.add_switch():
            pytest.skip(f"cannot make network namespaces here: {why}")
        for role, addresses in HOSTS.items():
            net.add_host(role, addresses)
        assert main(["certs", "--out", str(root / "certs"), "--host", COORDINATOR]) == 0
        (root / "auth").mkdir()
        for name in [*(f"n{i}" for i in range(NODES)), "stray"]:  # every key registered: only the address differs
            assert main(["node-key", "--out", str(root / "keys"), "--name", name]) == 0
            shutil.copy(root / "keys" / f"{name}.pub", root / "auth")
        for i in range(NODES):
            write_jsonl(root / f"node{i}.jsonl", records(100 * i, 24))
        write_jsonl(root / "held.jsonl", records(1000, 24))
        dep.start_coordinator()
        dep.wait_for_log("coordinator", "registered node key", NODES + 1)
        for i in range(NODES):
            dep.start_node(i)
        yield dep, net
    finally:
        dep.sup.stop_all()
        left = net.close()
    assert left == [], f"network namespaces left: {left}"
    assert_no_leftovers(dep.sup)


def _statuses(dep: Deployment, net: Network) -> dict[int, str]:
    """Node id -> status in the SuperLink, asked from node 0's host over the coordinator's address."""
    from fedswarm.common.flower_config import write_connection

    home = dep.root / "flwr"
    write_connection(home, "local", f"{COORDINATOR}:{PORT}", str(dep.root / "certs" / "ca.crt"), insecure=False)
    cmd = [*net.exec("node0"), flower_tool("flwr"), "supernode", "list", "local", "--format", "json"]
    done = dep.sup.run("flwr supernode list", cmd, flower_env(home), timeout=120.0)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    answer = json.loads(done.stdout[done.stdout.find("{") :])
    return {int(node["node-id"]): node["status"] for node in answer["nodes"]}


def test_a_node_dialling_an_address_the_certificate_lacks_is_refused(hosts):
    dep, net = hosts
    started = time.monotonic()
    stray = dep.start("stray", *dep.node_args("stray", dep.root / "node0.jsonl", address=UNCOVERED))
    try:
        code = stray.wait(timeout=REFUSAL_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"stray node still runs after {REFUSAL_BOUND_S} s:\n{dep.log('stray')[-3000:]}") from None
    log = dep.log("stray")
    print(f"stray node refused in {time.monotonic() - started:.1f} s with code {code}")
    assert code != 0, log[-3000:]
    # the TLS check refused it (the address answers): e.g. "certificate is not valid for '10.77.0.2'"
    why = [line for line in log.splitlines() if "certificate verify failed" in line.lower()]
    assert why and UNCOVERED in why[0], log[-3000:]
    said = [line for line in log.splitlines() if "error:" in line and "does not trust the coordinator" in line]
    assert said and "--host" in said[-1] and "registered" not in said[-1], log[-3000:]  # not "key not registered"
    ids = _node_ids(dep.log("coordinator"))
    deadline = time.monotonic() + 120.0
    while any((statuses := _statuses(dep, net)).get(ids[f"n{i}"]) != "online" for i in range(NODES)):
        assert time.monotonic() < deadline, f"nodes dialling {COORDINATOR} not online: {statuses}"
        time.sleep(2.0)
    assert statuses[ids["stray"]] == "registered", statuses  # its key is known; it never came online


def test_two_rounds_between_separate_hosts(hosts):
    dep, _ = hosts
    done = dep.run(*dep.run_args("hosts"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "completed" in done.stdout
    rows = dep.metrics("hosts")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"] == NODES and row["failures"] == 0, row  # the stray node never counts
    assert (dep.runs / "hosts" / "adapter" / "adapter_model.safetensors").is_file()
