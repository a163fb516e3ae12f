"""``fedswarm swarm`` user errors: one line, exit status 2, before anything heavy loads."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _swarm(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "swarm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_bad_block_span_is_one_line():
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm swarm: error: --blocks '3': expected START:END, e.g. 0:15 (END exclusive)"
    ]


def test_unreachable_registry_is_one_line():
    proc = _swarm("generate", "--registry", "127.0.0.1:1", "hello")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "fedswarm swarm: error: registry unreachable: 127.0.0.1:1 (UNAVAILABLE)"


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_usable(), reason="checks the error on machines without CUDA")
def test_device_cuda_without_a_gpu_is_one_line():
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "0:2", "--device", "cuda")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fedswarm swarm: error: --device cuda: no CUDA GPU is usable here")
    assert lines[0].endswith("use --device cpu")


def test_unknown_device_is_one_line():
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "0:2", "--device", "tpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm swarm: error: --device 'tpu': expected one of auto, cpu, cuda"
    ]


def test_tls_key_without_certificate_is_one_line(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    proc = _swarm("registry", "--tls-key", str(key))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm swarm: error: --tls-cert and --tls-key go together: give both or neither"
    ]


def test_missing_adapter_folder_is_one_line(tmp_path):
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--blocks", "0:2", "--adapter", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedswarm swarm: error: --adapter {str(tmp_path)!r}: not a PEFT adapter folder "
        "(missing adapter_config.json, adapter_model.safetensors)"
    ]


def test_adapter_name_given_twice_is_one_line(tmp_path):
    args = ["--adapter", f"fed={tmp_path}/a", "--adapter", f"fed={tmp_path}/b"]
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--blocks", "0:2", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedswarm swarm: error: --adapter 'fed={tmp_path}/b': adapter name 'fed' is given twice"
    ]


def test_building_the_cli_imports_neither_torch_nor_grpc():
    code = (
        "import sys, fedswarm.common.cli as cli; cli.build_parser();"
        "print([m for m in ('torch', 'grpc', 'transformers', 'google.protobuf') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_api_with_an_unreachable_registry_is_one_line():
    proc = _swarm("api", "--registry", "127.0.0.1:1", "--port", "0")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == "fedswarm swarm: error: registry unreachable: 127.0.0.1:1 (UNAVAILABLE)"
    )


def test_api_bad_concurrency_is_one_line():
    proc = _swarm("api", "--registry", "127.0.0.1:1", "--concurrency", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fedswarm swarm: error: --concurrency must be >= 1, got 0"]
