"""``--blocks auto`` with real processes: three servers of the tiny model (4 blocks, 2 each) cover the
model by themselves; when the one that alone holds some block is killed, a survivor moves to the gap
and a generation through the swarm equals the local model's greedy tokens again.

The servers start at once, so they all see an empty registry and take blocks 0:2; covering 2:4 is
then the rebalancing's job too (one of them moves, the others stand down).
"""

from __future__ import annotations

import time

import pytest
import torch

from fedswarm.common.model import load_model, parse_model
from fedswarm.common.processes import free_port
from fedswarm.common.security.transport import Security
from tests.conftest import assert_no_leftovers
from tests.swarm_support import PROMPT, Procs

pytestmark = pytest.mark.integration

NEW_TOKENS = 6
TTL_S = 5.0  # a killed server's entry lapses within this (the insecure servers share one announce budget: 2/s)
REBALANCE_S = 0.5


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

    procs = Procs(tmp_path, token=None)
    security = Security(insecure=True)
    registry = f"127.0.0.1:{free_port()}"
    try:
        procs.fork("registry", "registry", "--port", registry.rsplit(":", 1)[1], "--insecure")
        common = ["--registry", registry, "--model", "tiny", "--blocks", "auto", "--num-blocks", "2", "--insecure"]
        common += ["--threads", "1", "--throughput", "100", "--ttl", str(TTL_S)]
        common += ["--rebalance-interval", str(REBALANCE_S)]
        for name in "abc":
            procs.fork(name, "serve", *common)
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
