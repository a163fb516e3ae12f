"""Real block servers on 127.0.0.1 serving two unmerged adapters at once, concurrent sessions batched.

Layout (tiny model, 4 blocks): a registry; s1[0:2] and s2[2:4], each with ``--adapter a1=DIR1
--adapter a2=DIR2 --adapter-dir ROOT`` (kept unmerged, chosen per request). An adapter written
under ROOT while serving is served next; the last test replaces DIR1 while a generation is
running: that generation finishes on the old version, the next one uses the new.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedswarm.client.swarm.client import SwarmClient
from fedswarm.client.swarm.discovery import UnknownAdapterError, list_servers
from fedswarm.client.swarm.head import load_head
from fedswarm.client.swarm.model import SwarmModel
from fedswarm.common.adapter_digest import adapter_id
from fedswarm.common.model import load_model, parse_model
from fedswarm.common.processes import free_port
from fedswarm.common.security.transport import Security
from tests.conftest import assert_no_leftovers
from tests.swarm_support import FORKSERVER, PROMPT, TOKEN, Procs, local_greedy, make_adapter, noop, roundoff_tol

pytestmark = pytest.mark.integration

NEW_TOKENS = 10


@dataclass
class AdapterSwarm:
    procs: Procs
    security: Security
    folders: dict[str, Path]
    head: object
    root: Path

    @property
    def registry(self) -> list[str]:
        return [self.procs.addresses["reg"]]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter-swarm")
    warm = FORKSERVER.Process(target=noop)
    warm.start()
    folders = {"a1": make_adapter(folder / "a1" / "adapter", seed=1), "a2": make_adapter(folder / "a2", seed=2)}
    procs = Procs(folder)
    root = folder / "runs"
    root.mkdir()
    try:
        port = free_port()
        procs.fork("reg", "registry", "--port", str(port), "--insecure")
        procs.addresses["reg"] = f"127.0.0.1:{port}"
        common = ["--registry", procs.addresses["reg"], "--model", "tiny", "--threads", "1", "--ttl", "30"]
        common.append("--insecure")  # the secure swarm is tested in test_swarm_integration
        common += [f"--adapter=a1={folders['a1']}", f"--adapter=a2={folders['a2']}", "--adapter-poll", "0.3"]
        common += ["--batch-wait-ms", "20", "--adapter-dir", str(root)]
        for name, blocks in (("s1", "0:2"), ("s2", "2:4")):
            procs.fork(name, "serve", "--blocks", blocks, *common)
        procs.wait_ready("reg", "s1", "s2")
        security = Security(token=TOKEN)
        _wait_for(security, procs.addresses["reg"], {"a1": adapter_id(folders["a1"]), "a2": adapter_id(folders["a2"])})
        yield AdapterSwarm(procs, security, folders, load_head(parse_model("tiny")), root)
    finally:
        procs.stop_all()
        warm.join(timeout=5)
    assert_no_leftovers(procs.sup)


def _wait_for(security: Security, registry: str, digests: dict[str, str], servers: int = 2) -> None:
    """Until ``servers`` servers announce each adapter in the given version."""
    deadline = time.monotonic() + 60
    while True:
        listed = list_servers([registry], security)
        announced = [{a.name: a.digest for a in info.adapters} for info in listed]
        if len(listed) == servers and all(all(a.get(n) == d for n, d in digests.items()) for a in announced):
            return
        assert time.monotonic() < deadline, f"registry lists {announced}, waiting for {digests}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def references(swarm):
    from peft import PeftModel

    out = {"": local_greedy(load_model("tiny"), NEW_TOKENS)}
    for name, folder in swarm.folders.items():
        out[name] = local_greedy(PeftModel.from_pretrained(load_model("tiny"), folder).eval(), NEW_TOKENS)
    return out


def _generate(swarm: AdapterSwarm, adapter: str, on_token=None):
    client = SwarmClient(swarm.registry, swarm.security, adapter=adapter)
    try:
        return SwarmModel(client, swarm.head).generate(PROMPT, NEW_TOKENS, on_token=on_token)  # type: ignore[arg-type]
    finally:
        client.close()


def _assert_same(result, tokens, logits) -> None:
    assert result.tokens == tokens
    for got, want in zip(result.logits, logits, strict=True):
        assert (got - want).abs().max() <= roundoff_tol(want)


def test_two_unmerged_adapters_each_match_their_peft_model(swarm, references):
    for adapter in ("a1", "a2", ""):
        _assert_same(_generate(swarm, adapter), *references[adapter])
    assert references["a1"][0] != references["a2"][0] != references[""][0]  # the adapters do differ


def test_concurrent_sessions_with_different_adapters_are_batched_and_unchanged(swarm, references):
    adapters = ["a1", "a2", "", "a1", "a2", ""]
    results: dict[int, object] = {}
    batches: list[int] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = _generate(
                swarm, adapters[i], lambda _t, s: batches.extend(h.stream.batch_size for h in s.links)
            )
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(adapters))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for i, adapter in enumerate(adapters):
        _assert_same(results[i], *references[adapter])
    assert max(batches) > 1, batches  # some steps ran as one batch of several sessions


def test_unknown_adapter_is_one_clear_error(swarm):
    client = SwarmClient(swarm.registry, swarm.security, adapter="nope")
    try:
        with pytest.raises(
            UnknownAdapterError, match=r"no live server serves adapter 'nope' \(adapters served: a1, a2\)"
        ):
            SwarmModel(client, swarm.head).generate(PROMPT, 2)  # type: ignore[arg-type]
    finally:
        client.close()


def test_adapter_added_while_serving_is_used_by_the_next_request(swarm):
    from peft import PeftModel

    folder = make_adapter(swarm.root / "round7" / "adapter", seed=7)
    digests = {"a1": adapter_id(swarm.folders["a1"]), "a2": adapter_id(swarm.folders["a2"])}
    _wait_for(swarm.security, swarm.registry[0], {**digests, "round7": adapter_id(folder)})
    expected = local_greedy(PeftModel.from_pretrained(load_model("tiny"), folder).eval(), NEW_TOKENS)
    _assert_same(_generate(swarm, "round7"), *expected)


def test_adapter_replaced_while_serving_is_used_by_the_next_request(swarm, references, tmp_path):
    from peft import PeftModel

    folder = swarm.folders["a1"]
    new = make_adapter(tmp_path / "round2", seed=3)
    new_digest = adapter_id(new)
    stale = [SwarmClient(swarm.registry, swarm.security, adapter="a1") for _ in range(2)]  # lists read before

    def replace_once(_token, session) -> None:
        if session.length == len(PROMPT) + 2:  # mid-generation: this session keeps the version it started on
            shutil.rmtree(folder)
            new.rename(folder)
            _wait_for(swarm.security, swarm.registry[0], {"a1": new_digest, "a2": adapter_id(swarm.folders["a2"])})

    _assert_same(_generate(swarm, "a1", replace_once), *references["a1"])
    replaced = PeftModel.from_pretrained(load_model("tiny"), folder).eval()
    expected = local_greedy(replaced, NEW_TOKENS)
    assert expected[0] != references["a1"][0]
    _assert_same(_generate(swarm, "a1"), *expected)
    try:  # clients that still list the old version: refused at the first step, they re-plan on the new one
        assert stale[0].adapter_version().digest != new_digest
        _assert_same(SwarmModel(stale[0], swarm.head).generate(PROMPT, NEW_TOKENS), *expected)  # type: ignore[arg-type]
        ids = torch.tensor([PROMPT])
        logits = SwarmModel(stale[1], swarm.head).logits(ids)  # type: ignore[arg-type]
        with torch.no_grad():
            want = replaced(ids).logits
        assert (logits - want).abs().max() <= roundoff_tol(want)
    finally:
        for client in stale:
            client.close()
