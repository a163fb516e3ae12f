"""``--blocks auto`` with real processes: three servers of the tiny model (4 blocks, 2 each) cover the
model by themselves; when the one that alone holds some block is killed, a survivor moves to the gap
and a generation through the swarm equals the local model's greedy tokens again.

The servers start at once, so they all see an empty registry and take blocks 0:2; covering 2:4 is
then the rebalancing's job too (one of them moves, the others stand down).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from fedswarm.common.model import load_model, parse_model
from fedswarm.common.processes import Supervisor, free_port
from fedswarm.protos.transport import Security
from tests.conftest import assert_no_leftovers

pytestmark = pytest.mark.integration

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
NEW_TOKENS = 6
TTL_S = 5.0  # a killed server's entry lapses within this (the insecure servers share one announce budget: 2/s)
REBALANCE_S = 0.5
START_TIMEOUT_S = 60.0

_FORKSERVER = multiprocessing.get_context("forkserver")  # one forkserver per test process, torch imported once
_FORKSERVER.set_forkserver_preload(
    ["torch", "transformers.models.llama.modeling_llama", "fedswarm.server.swarm.server", "fedswarm.server.swarm.cli"]
)


def _run_cli(log_path: str, argv: list[str]) -> None:
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    from fedswarm.common.cli import main

    sys.exit(main(argv))


class Forked:
    """``fedswarm swarm ...`` processes forked from the forkserver, supervised, each with a log file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sup = Supervisor(grace=5.0)
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}

    def start(self, name: str, *argv: str) -> None:
        log = self.folder / f"{name}.log"
        log.touch()
        proc = _FORKSERVER.Process(target=_run_cli, args=(str(log), ["swarm", *argv]))
        proc.start()
        self.procs[name] = proc
        self.sup.adopt(name, proc.pid)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def wait_ready(self, *names: str) -> dict[str, str]:
        """Each server's address, once it prints that it is ready."""
        deadline, found = time.monotonic() + START_TIMEOUT_S, {}
        while len(found) < len(names):
            for name in set(names) - set(found):
                match = re.search(r"ready on (\S+)", self.log(name))
                if match:
                    found[name] = match.group(1)
                elif not self.sup.running(name) or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{self.log(name)}")
            time.sleep(0.1)
        return found

    def stop_all(self) -> None:
        self.sup.stop(*(name for name in self.procs if name != "registry"))  # servers withdraw first
        self.sup.stop_all()
        for proc in self.procs.values():
            proc.join(timeout=5)


def _spans(registry: str, security: Security) -> dict[str, tuple[int, int]]:
    from fedswarm.client.swarm.discovery import list_servers

    return {s.address: (s.start, s.end) for s in list_servers([registry], security)}


def _wait_covered(registry: str, security: Security, live: set[str], timeout: float) -> dict[str, tuple[int, int]]:
    """Until the registry lists exactly ``live`` and they hold every block; their spans."""
    deadline = time.monotonic() + timeout
    while True:
        spans = _spans(registry, security)
        if set(spans) == live and set().union(*(range(*span) for span in spans.values())) == set(range(4)):
            return spans
        assert time.monotonic() < deadline, f"not covered within {timeout:.0f} s: {spans}"
        time.sleep(0.2)


def test_auto_servers_cover_the_model_and_close_the_gap_a_killed_one_leaves(tmp_path):
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.model import SwarmModel

    procs = Forked(tmp_path)
    security = Security(insecure=True)
    registry = f"127.0.0.1:{free_port()}"
    try:
        procs.start("registry", "registry", "--port", registry.rsplit(":", 1)[1], "--insecure")
        common = ["--registry", registry, "--model", "tiny", "--blocks", "auto", "--num-blocks", "2", "--insecure"]
        common += ["--threads", "1", "--throughput", "100", "--ttl", str(TTL_S)]
        common += ["--rebalance-interval", str(REBALANCE_S)]
        for name in "abc":
            procs.start(name, "serve", *common)
        addresses = procs.wait_ready(*"abc")
        names = {address: name for name, address in addresses.items()}
        spans = _wait_covered(registry, security, set(names), timeout=15)

        # the server that alone holds some block (there is one: 6 block slots cannot hold 4 blocks twice)
        alone = next(a for a, (s, e) in spans.items() if any(_holders(spans, b) == 1 for b in range(s, e)))
        procs.sup.kill(names[alone])
        survivors = set(names) - {alone}
        _wait_covered(registry, security, survivors, timeout=TTL_S + 10)  # its entry lapses, a survivor moves
        movers = [a for a in survivors if "moving from blocks" in procs.log(names[a])]
        assert movers, {names[a]: procs.log(names[a]) for a in survivors}

        client = SwarmClient([registry], security, adapter_id="")
        try:
            result = SwarmModel(client, load_head(parse_model("tiny"))).generate(PROMPT, NEW_TOKENS)
        finally:
            client.close()
        local = load_model("tiny").generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )
        assert result.tokens == local[0, len(PROMPT) :].tolist()
    finally:
        procs.stop_all()
    assert_no_leftovers(procs.sup)


def _holders(spans: dict[str, tuple[int, int]], block: int) -> int:
    return sum(start <= block < end for start, end in spans.values())
