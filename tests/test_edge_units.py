"""Fast checks of the edge export's pieces: argument parsing, the shared embedding quantiser, the model card."""

import subprocess
import sys

import numpy as np
import pytest

from fedswarm.client.edge.merge import RunInfo, resolve_adapter
from fedswarm.client.edge.variants import parse_quant
from fedswarm.common.errors import FedswarmError


def _cli(*args):
    cmd = [sys.executable, "-m", "fedswarm.common.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_parse_quant_keeps_order_and_always_fp32():
    assert parse_quant("q4,int8") == ("fp32", "int8", "q4")
    assert parse_quant("fp32") == ("fp32",)
    with pytest.raises(FedswarmError, match="'q3'"):
        parse_quant("int8,q3")


@pytest.mark.processes
def test_unknown_quant_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "edge"
    proc = _cli("export", "--adapter", "none", "--model", "tiny", "--out", str(out), "--quant", "int8,q2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm export: error: --quant 'q2': unknown variant; expected a comma-separated subset of "
        "fp32, int8, q4, q4f16"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.processes
def test_bad_adapter_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "edge"
    proc = _cli("export", "--adapter", str(tmp_path / "nope"), "--model", "tiny", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--adapter" in lines[0] and "no such folder" in lines[0]
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    proc = _cli("export", "--adapter", str(tmp_path / "empty"), "--model", "tiny", "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "adapter_config.json" in lines[0]
    assert not out.exists()


@pytest.mark.processes
def test_serve_web_refuses_a_non_export(tmp_path):
    proc = _cli("serve-web", str(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not an edge export" in lines[0]


def test_adapter_summary_and_privacy_are_read(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}")
    (tmp_path / "summary.json").write_text('{"config": {"model": "tiny"}, "privacy": {"epsilon": 3.5, "delta": 1e-5}}')
    run = resolve_adapter(str(adapter))
    assert run.config["model"] == "tiny"
    assert run.privacy == {"epsilon": 3.5, "delta": 1e-5}
    assert resolve_adapter("none") == RunInfo(None)


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_quantisation_roundtrips_within_half_a_step(bits):
    from fedswarm.client.edge.quantize import quantize_blockwise

    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    packed, scales = quantize_blockwise(w, bits, 32)
    assert packed.shape == (8, 64 * bits // 8) and scales.shape == (8, 2)
    q = np.empty(w.shape, np.int16)
    if bits == 4:
        q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
    else:
        q[:] = packed
    deq = ((q - 2 ** (bits - 1)).reshape(8, 2, 32) * scales[..., None]).reshape(w.shape)
    assert np.all(np.abs(deq - w) <= scales.repeat(32, axis=1) / 2 + 1e-6)


def _tied_graph(vocab=96, hidden=64):
    """Gather(E, ids) -> MatMul(., Transpose(E)): the shape of optimum's tied embedding/head."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).normal(size=(vocab, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5, vocab])],
        [numpy_helper.from_array(weight, "E")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weight


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_shares_one_quantised_matrix(bits):
    import onnx
    import onnxruntime as ort

    from fedswarm.client.edge.quantize import quantize_blockwise, quantize_tied_embedding

    model, weight = _tied_graph()
    assert quantize_tied_embedding(model, bits, 32)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" in ops and "Transpose" not in ops
    assert "GatherBlockQuantized" not in ops  # onnxruntime-web's wasm build lacks it
    assert [
        i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims == [96, 64]
    ] == []
    ids = np.array([[0, 5, 17, 95, 3]], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    packed, scales = quantize_blockwise(weight, bits, 32)
    q = np.empty(weight.shape, np.int16)
    if bits == 4:
        q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
    else:
        q[:] = packed
    deq = ((q - 2 ** (bits - 1)).reshape(96, 2, 32) * scales[..., None]).reshape(weight.shape)
    want = deq[ids[0]] @ deq.T
    # MatMulNBits quantises its activations to int8 per block (accuracy level 4): a small relative error
    assert np.abs(got[0] - want).max() < 0.02 * np.abs(want).max()


def test_model_card_states_privacy_or_its_absence(tmp_path):
    from fedswarm.client.edge.card import model_card
    from fedswarm.client.edge.parity import Parity, VariantParity

    row = VariantParity("fp32", "onnx/model.onnx", 10, 1.0, 1.0, 0.0, 0.0, 5.0, 0.0, 0.999, True)
    parity = Parity([row], 5.0, 2, 20)
    adapter = tmp_path / "run" / "adapter"
    with_dp = RunInfo(
        adapter, {"config": {"data": "sarcasm", "rounds": 3, "clients": 4}, "privacy": {"epsilon": 2.0, "delta": 1e-5}}
    )
    card = model_card("smollm2-135m", with_dp, parity)
    assert "ε = 2" in card and "δ = 1e-05" in card and "3 rounds, 4 clients" in card and "| fp32 |" in card
    assert "no differential-privacy" in model_card("tiny", RunInfo(adapter, {}), parity)
    # a run's own summary.json form: local DP with each node's figures
    figures = {"accountant": "prv", "delta": 1e-5, "max_grad_norm": 1.0, "history": [[0.5, 0.01, 24]], "epsilon": 7.9}
    nodes = {"7": figures}
    local = {"epsilon_max": 7.9, "epsilon_mean": 7.5, "delta": 1e-5, "accountant": "prv", "nodes": nodes}
    card = model_card("tiny", RunInfo(adapter, {"config": {}, "privacy": {"local": local}}), parity)
    assert "ε = 7.9" in card and "accountant prv" in card
    assert "| 7 | prv | (0.5, 0.01, 24) | 1 | 1e-05 | 7.9 |" in card
    named = {**figures, "history": [{"noise_multiplier": 0.5, "sample_rate": 0.01, "steps": 24}]}
    local = {**local, "nodes": {"7": named}}
    card = model_card("tiny", RunInfo(adapter, {"config": {}, "privacy": {"local": local}}), parity)
    assert "| 7 | prv | (0.5, 0.01, 24) | 1 | 1e-05 | 7.9 |" in card  # the named form reads the same


def test_scales_stored_as_float16_give_the_same_logits_and_restore_exactly():
    import onnx
    import onnxruntime as ort

    from fedswarm.client.edge.quantize import float_scales, half_scales, quantize_tied_embedding

    model, _ = _tied_graph()
    assert quantize_tied_embedding(model, 8, 32)
    before = model.SerializeToString()
    scales = [(i.name, i.data_type) for i in model.graph.initializer if i.name.endswith("_scales")]
    assert [t for _, t in scales] == [onnx.TensorProto.FLOAT]
    name = scales[0][0]
    ids = np.array([[0, 5, 17, 95, 3]], dtype=np.int64)

    def logits(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"ids": ids})[0]

    want = logits(model)
    half_scales(model)
    stored = {i.name: i.data_type for i in model.graph.initializer}
    assert stored[name + "_fp16"] == onnx.TensorProto.FLOAT16 and name not in stored
    half = next(i for i in model.graph.initializer if i.name == name + "_fp16")
    assert len(half.raw_data) == 96 * 2 * 2  # 96 rows x 2 blocks x 2 bytes, half of float32's
    assert len(model.SerializeToString()) < len(before)
    np.testing.assert_array_equal(logits(model), want)  # the scales were exact halves: nothing changes
    float_scales(model)
    assert model.SerializeToString() == before
    np.testing.assert_array_equal(logits(model), want)


def test_half_scales_leaves_scales_that_are_not_exact_halves():
    import onnx

    from fedswarm.client.edge.quantize import half_scales, quantize_tied_embedding

    model, _ = _tied_graph()
    assert quantize_tied_embedding(model, 8, 32)
    init = next(i for i in model.graph.initializer if i.name.endswith("_scales"))
    name, value = init.name, onnx.numpy_helper.to_array(init).copy()
    value[0, 0] *= np.float32(1.0001)  # between two float16 values (their spacing is ~1e-3 relative)
    init.CopyFrom(onnx.numpy_helper.from_array(value, name))
    half_scales(model)
    assert {i.name: i.data_type for i in model.graph.initializer}[name] == onnx.TensorProto.FLOAT
