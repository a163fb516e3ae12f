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


def test_gptq_refuses_columns_that_do_not_divide_into_blocks():
    import torch

    from fedswarm.client.edge.gptq import gptq_linear

    with pytest.raises(ValueError, match="do not divide into blocks of 32"):
        gptq_linear(torch.zeros(4, 48), torch.eye(48), 4, 32)


@pytest.mark.slow
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
