"""The export end to end on the tiny model: layout, parity.json, optimum reload, serving."""

import json
import subprocess
import sys
import urllib.request

import pytest

from tests.edge_support import ANSWER_TOKENS, held_out_prompts, tiny_run

pytestmark = pytest.mark.integration

NEW_TOKENS = ANSWER_TOKENS  # the trained reply (past it the tiny model is random again)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    adapter = tiny_run(root / "run")
    out = root / "edge"
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "export", "--adapter", str(adapter), "--out", str(out)]
    cmd += ["--quant", "fp32,int8", "--parity-samples", "8", "--parity-max-len", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_layout_is_what_transformers_js_reads(edge):
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (edge / name).is_file(), name
    assert sorted(p.name for p in (edge / "onnx").iterdir()) == ["model.onnx", "model_quantized.onnx"]
    tokenizer_config = json.loads((edge / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert not (edge / "chat_template.jinja").exists()
    assert json.loads((edge / "web" / "edge.json").read_text())["dtypes"] == {"fp32": "fp32", "int8": "q8"}
    assert not [p for p in edge.parent.iterdir() if p.name.startswith(".edge")]  # no temp folders left


def test_parity_json_holds_the_figures(edge):
    parity = json.loads((edge / "parity.json").read_text())
    assert parity["passed"] and parity["texts"] == 8 and parity["positions"] > 100
    fp32, int8 = parity["variants"]["fp32"], parity["variants"]["int8"]
    assert fp32["next_token_agreement"] >= 0.999 and fp32["max_logit_error"] < 1e-3
    assert fp32["size_vs_fp32"] == 1.0 and int8["size_vs_fp32"] < 0.5
    assert abs(fp32["perplexity_change"]) < 1e-4
    for key in ("max_logit_error", "mean_logit_error", "perplexity", "next_token_agreement", "size_bytes"):
        assert isinstance(int8[key], (int, float))
    card = (edge / "README.md").read_text()
    assert "| int8 | `onnx/model_quantized.onnx` |" in card and "sarcasm" in card
    how = parity["quantisation"]
    assert set(how) == {"calibration", "int8"} and "GPTQ" in how["calibration"]
    assert f"- int8: {how['int8']}" in card and how["int8"].startswith("8-bit weights in blocks of 64")


def test_int8_block_scales_are_stored_as_float16(edge):
    import onnx

    model = onnx.load(edge / "onnx" / "model_quantized.onnx")
    inits = {i.name: i.data_type for i in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    scales = [n.input[2] for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(scales) > 20  # every linear layer of the tiny model, and the tied head
    assert all(inits.get(casts.get(name, "")) == onnx.TensorProto.FLOAT16 for name in scales)
    assert "float16 block scales" in json.loads((edge / "parity.json").read_text())["quantisation"]["int8"]


@pytest.fixture(scope="module")
def reference(edge):
    from peft import PeftModel

    from fedswarm.common.model import load_model

    return PeftModel.from_pretrained(load_model("tiny"), str(edge.parent / "run" / "adapter")).merge_and_unload()


@pytest.mark.parametrize("file_name", ["model.onnx", "model_quantized.onnx"])
def test_optimum_reload_generates_pytorchs_greedy_tokens(edge, reference, file_name):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_model = ORTModelForCausalLM.from_pretrained(edge, subfolder="onnx", file_name=file_name)
    for prompt in held_out_prompts(3):
        ids = torch.tensor([prompt])
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": NEW_TOKENS}
        with torch.no_grad():
            want = reference.generate(**kwargs, do_sample=False)[0].tolist()
        got = onnx_model.generate(**kwargs, do_sample=False)[0].tolist()
        assert got == want, f"{file_name}: {got[len(prompt) :]} != {want[len(prompt) :]}"


def test_serve_web_serves_page_model_and_runtime(edge):
    from fedswarm.client.edge.serve import serve_in_thread

    server, url = serve_in_thread(edge)
    try:
        with urllib.request.urlopen(url) as page:
            assert page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert b'src="./app.js"' in page.read()
        base = url.removesuffix("web/")
        with urllib.request.urlopen(base + "onnx/model_quantized.onnx") as model:
            assert int(model.headers["Content-Length"]) == (edge / "onnx" / "model_quantized.onnx").stat().st_size
        with urllib.request.urlopen(url + "vendor/ort-wasm-simd-threaded.asyncify.wasm") as wasm:
            assert wasm.headers["Content-Type"] == "application/wasm"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "../../etc/passwd")
    finally:
        server.shutdown()
        server.server_close()


def test_export_refuses_a_variant_below_min_agreement(tmp_path):
    out = tmp_path / "edge"
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "export", "--adapter", "none", "--model", "tiny"]
    cmd += ["--out", str(out), "--quant", "q4", "--min-agreement", "0.99", "--parity-samples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedswarm export: error: parity check failed: q4 next-token agreement 0.")
    assert "< 0.99" in last and "not written" in last
    assert list(tmp_path.iterdir()) == []
