import subprocess
import sys

import pytest

from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import load_model, parse_model


def test_smollm2_tokenizer_matches_reference(tokenizer):
    # "tiny" uses the converted SmolLM2 tokenizer: no BOS, ChatML template kept
    assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm2_config_keeps_rope_theta():
    import json

    from fedswarm.common.gguf_convert import smollm2_folder

    config = json.loads((smollm2_folder() / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert config["num_hidden_layers"] == 30


@pytest.mark.processes
def test_tiny_model_is_identical_across_processes():
    import torch

    code = (
        "from fedswarm.common.model import load_model;import torch;"
        "m=load_model('tiny');print(sum(float(p.double().sum()) for p in m.parameters()))"
    )
    other = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    here = sum(float(p.double().sum()) for p in load_model("tiny").parameters())
    assert other == here
    torch.manual_seed(99)  # the global RNG does not leak into the tiny weights
    assert sum(float(p.double().sum()) for p in load_model("tiny").parameters()) == here


def test_unknown_model_is_one_line_error(tmp_path):
    with pytest.raises(FedswarmError, match=r"--model 'gpt-9': no such folder; expected one of smollm2-135m, tiny"):
        parse_model("gpt-9")
    with pytest.raises(FedswarmError, match="no config.json"):
        parse_model(str(tmp_path))


def test_local_folder_model_loads(tmp_path):
    model = load_model("tiny")
    model.save_pretrained(tmp_path)
    spec = parse_model(str(tmp_path))
    assert spec.name == "path"
    loaded = load_model(spec)
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers
