"""GPTQ: output error below round-to-nearest's, and codes that reach the ONNX graph exactly as computed."""

import numpy as np
import pytest


def _layer(rows=24, cols=128, tokens=512, seed=0):
    """A weight and inputs with correlated features (what makes GPTQ's error feedback pay)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mixing = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mixing
    x[:, 5] = 0.0  # an input that never fires: its column must not break the Cholesky
    return weight, x


def _rtn(weight, bits, block):
    qmax = 2 ** (bits - 1) - 1
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    scales = blocks.abs().amax(dim=2, keepdim=True) / qmax
    return (blocks / scales).round().clamp(-qmax, qmax).mul(scales).reshape(rows, cols)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_output_error_is_below_round_to_nearest(bits):
    import torch

    from fedswarm.client.edge.gptq import gptq_linear

    weight, x = _layer()
    hessian = 2 * x.T @ x / x.shape[0]
    q = gptq_linear(weight, hessian, bits, 32)
    assert q.codes.shape == (24, 128) and q.scales.shape == (24, 4)
    assert q.codes.min() >= -(2 ** (bits - 1)) and q.codes.max() <= 2 ** (bits - 1) - 1
    # the dequantised weight is exactly codes x block scale
    manual = (q.codes.reshape(24, 4, 32) * q.scales[..., None]).reshape(24, 128)
    np.testing.assert_array_equal(q.dequantize(), manual.astype(np.float32))
    gptq_err = torch.linalg.norm(x @ (weight - torch.from_numpy(q.dequantize()).double()).T)
    rtn_err = torch.linalg.norm(x @ (weight - _rtn(weight, bits, 32)).T)
    assert gptq_err < 0.85 * rtn_err, (float(gptq_err), float(rtn_err))
    assert torch.linalg.norm(x @ weight.T) > 10 * rtn_err  # both are small errors of a real output


@pytest.mark.parametrize("bits", [4, 8])
def test_a_tail_block_runs_as_two_matmulnbits_on_slices(bits):
    """80 inputs in blocks of 64: one full block and a tail of 16, each part its own MatMulNBits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fedswarm.client.edge.gptq import gptq_linear
    from fedswarm.client.edge.quantize import apply_quantized

    weight, x = _layer(rows=8, cols=80)
    q = gptq_linear(weight, 2 * x.T @ x / x.shape[0], bits, 64)
    assert q.tail == 16 and q.scales.shape == (8, 2)
    np.testing.assert_array_equal(q.dequantize()[:, 64:], q.codes[:, 64:] * q.scales[:, 1:2])
    name = "/model/layers.0/mlp/up_proj/MatMul"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name=name)],
        "linear",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 80])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])],
        [numpy_helper.from_array(weight.T.float().numpy().copy(), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert apply_quantized(model, {"model.layers.0.mlp.up_proj": q}, accuracy_level=0) == 1
    ops = sorted(n.op_type for n in model.graph.node if n.op_type != "Constant")
    assert ops == ["Add", "MatMulNBits", "MatMulNBits", "Slice", "Slice"]
    assert sorted(
        a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "K"
    ) == [16, 64]
    a = x[:3].float().numpy()[None]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    want = a @ q.dequantize().T
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert np.abs(a @ weight.T.float().numpy() - want).max() > 100 * np.abs(got - want).max()  # codes, not weights


def test_int8_plan_uses_wide_blocks_with_a_tail_and_keeps_the_head_whole():
    from fedswarm.client.edge.quantize import RECIPES

    int8, q4 = RECIPES["int8"], RECIPES["q4"]
    assert int8.layer_plan("model.layers.0.mlp.up_proj", (1536, 576)) == (8, 256)  # 2 x 256 + 64
    assert int8.layer_plan("model.layers.0.mlp.down_proj", (576, 1536)) == (8, 256)
    assert int8.layer_plan("lm_head", (49152, 576)) == (8, 64)
    assert q4.layer_plan("model.layers.0.mlp.up_proj", (1536, 576)) == (4, 32)
    assert q4.layer_plan("model.layers.0.self_attn.v_proj", (192, 576)) == (8, 64)  # kept at 8 bits
    assert int8.layer_plan("model.layers.0.mlp.up_proj", (8, 48)) == (8, 16)  # narrower than a block: one that divides
    assert int8.layer_plan("model.layers.0.mlp.up_proj", (8, 40)) is None  # no block of >= 16 divides 40: left to RTN


def test_gptq_codes_run_in_onnxruntime_as_the_dequantised_torch_model(tmp_path):
    """Every linear layer of the tiny model: GPTQ codes -> MatMulNBits; ORT logits == torch with those weights."""
    import onnx
    import torch

    from fedswarm.client.edge.gptq import gptq_model
    from fedswarm.client.edge.onnx_export import export_fp32
    from fedswarm.client.edge.quantize import Recipe, apply_quantized, quantize_tied_embedding
    from fedswarm.client.edge.runtime import OrtCausalLM
    from fedswarm.common.model import load_model

    model = load_model("tiny")
    recipe = Recipe(bits=4, block=32, embed_bits=8, embed_block=64, accuracy_level=0, eight_bit_layers=("down_proj",))
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 49152, (24,), generator=g).tolist() for _ in range(8)]
    before = {name: p.clone() for name, p in model.state_dict().items()}
    quantized = gptq_model(model, texts, recipe.layer_plan)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the model is left as it was
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(quantized) == sorted([*linears, "lm_head"])
    assert {q.bits for n, q in quantized.items() if "down_proj" in n} == {8}
    assert {q.bits for n, q in quantized.items() if "_proj" in n and "down_proj" not in n} == {4}
    assert (quantized["lm_head"].bits, quantized["lm_head"].block) == (8, 64)  # the tied head as the embedding

    fp32 = export_fp32(model, tmp_path / "model.onnx")
    graph = onnx.load(fp32)
    assert quantize_tied_embedding(graph, 8, 64, accuracy_level=0, codes=quantized["lm_head"])
    assert apply_quantized(graph, quantized, accuracy_level=0) == len(linears)
    assert [n.op_type for n in graph.graph.node].count("MatMul") == 2 * 4 + 1  # attention products, rotary
    onnx.save(graph, tmp_path / "model_gptq.onnx")

    reference = load_model("tiny")  # embedding and head tied: one weight takes the head's codes
    modules = dict(reference.named_modules())
    for name, q in quantized.items():
        modules[name].weight.data = torch.from_numpy(q.dequantize())
    assert reference.get_input_embeddings().weight.data_ptr() == reference.lm_head.weight.data_ptr()
    ids = texts[0][:16]
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    got = OrtCausalLM(tmp_path / "model_gptq.onnx").forward(ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale, np.abs(got - want).max()
    # and the codes matter: the unquantised model differs by far more
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(plain - want).max() > 100 * np.abs(got - want).max()
