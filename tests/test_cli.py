import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedswarm.common.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.processes
def test_bad_model_is_one_line_nonzero():
    proc = _run("simulate", "--model", "gpt-9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm simulate: error: --model 'gpt-9': no such folder; expected one of smollm2-135m, tiny "
        "or a local Hugging Face causal-LM folder"
    ]


@pytest.mark.processes
def test_bad_data_is_one_line_nonzero(tmp_path):
    proc = _run(
        "simulate",
        "--model",
        "tiny",
        "--data",
        str(tmp_path / "missing.jsonl"),
        "--out",
        str(tmp_path / "run"),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data" in lines[0] and "no such file" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
def test_bad_numbers_are_one_line_nonzero():
    proc = _run("simulate", "--model", "tiny", "--clients", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fedswarm simulate: error: --clients must be >= 1, got 0"]


@pytest.mark.processes
def test_import_common_stays_light():
    code = (
        "import sys, fedswarm.common.config, fedswarm.common.data, fedswarm.common.model, fedswarm.common.lora_state;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'opacus', 'onnxruntime', 'optimum', 'flwr', 'ray') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.processes
def test_unsupported_or_malformed_data_is_refused_before_ray_starts(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    proc = _run("simulate", "--model", "tiny", "--data", str(text), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedswarm simulate: error: --data {str(text)!r}: unsupported file type '.txt'; expected .jsonl, .json, "
        ".csv (chat/evals/Alpaca JSON lines, or a text,label CSV)"
    ]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": [{"role": "user", "content": "hi"}], "ideal": "yes"}\n{broken\n')
    proc = _run("simulate", "--model", "tiny", "--data", str(broken), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fedswarm simulate: error: {broken}:2: invalid JSON (Expecting "
                                                "property name enclosed in double quotes)"]  # fmt: skip
    assert not (tmp_path / "run").exists()  # nothing half-written, and no Ray (its warnings would be on stderr)


def test_a_bug_shows_its_traceback_and_a_user_error_one_line(monkeypatch, capsys):
    import pytest

    import fedswarm.simulation.simulate as simulate
    from fedswarm.common.cli import main
    from fedswarm.common.errors import InputError

    def bug(_args):
        raise ValueError("a library's internal check")

    monkeypatch.setattr(simulate, "run", bug)
    with pytest.raises(ValueError, match="a library's internal check"):
        main(["simulate"])

    def mistake(_args):
        raise InputError("--clients must be >= 1, got 0")

    monkeypatch.setattr(simulate, "run", mistake)
    assert main(["simulate"]) == 2
    assert capsys.readouterr().err.splitlines() == ["fedswarm simulate: error: --clients must be >= 1, got 0"]
