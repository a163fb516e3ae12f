"""Device selection, the QLoRA guard, and the GPU path (run only where CUDA exists)."""

import subprocess
import sys

import pytest
import torch

from fedswarm.common.device import check_quantize_base, resolve_device
from fedswarm.common.errors import FedswarmError

CUDA = torch.cuda.is_available()


def test_auto_resolves_to_the_available_device():
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(FedswarmError, match="expected one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.processes
@pytest.mark.skipif(CUDA, reason="checks the error on machines without CUDA")
def test_cpu_only_machine_gives_one_line_errors():
    with pytest.raises(FedswarmError, match="--device cuda: no CUDA GPU is usable here"):
        resolve_device("cuda")
    with pytest.raises(FedswarmError, match="--quantize-base 4bit needs a CUDA GPU"):
        check_quantize_base("4bit", resolve_device("auto"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--quantize-base", "4bit"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm simulate: error: --quantize-base 4bit needs a CUDA GPU (bitsandbytes QLoRA); this machine has none"
    ]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")
def test_gpu_training_and_dp_step_touch_only_lora(tokenizer):
    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.client.trainer.node_round import train_round
    from fedswarm.client.trainer.runtime import Shard
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.data import Example
    from fedswarm.common.lora_state import attach_lora
    from fedswarm.common.model import load_model

    model = attach_lora(load_model("tiny", device="cuda"), 4, 8.0, 0)
    examples = [Example((("user", f"q{i}"),), "1" if i % 2 else "0", None) for i in range(16)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_lora(model, tokenizer, examples, 2, 4, 1e-2, 32, seed=0, precision="auto")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    cfg = FederationConfig(model="tiny", dp=True, noise_multiplier=1.0, local_steps=2, batch_size=4, dp_seed=0)
    out = train_round(model, tokenizer, Shard(examples, [], 0), cfg, 1, None)
    assert out.metrics["epsilon"] > 0 and out.state is not None
