"""``fedswarm swarm`` user errors: one line, exit status 2, before anything heavy loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

INSECURE_WARNING = "anyone who reaches the swarm can read prompts and join it"


def _swarm(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "swarm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.processes
def test_bad_block_span_is_one_line():
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm swarm: error: --blocks '3': expected START:END, e.g. 0:15 (END exclusive)"
    ]


@pytest.mark.processes
def test_unreachable_registry_is_one_line():
    proc = _swarm("generate", "--registry", "127.0.0.1:1", "--insecure", "hello")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "fedswarm swarm: error: registry unreachable: 127.0.0.1:1 (UNAVAILABLE)"


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.processes
@pytest.mark.skipif(_cuda_usable(), reason="checks the error on machines without CUDA")
def test_device_cuda_without_a_gpu_is_one_line():
    proc = _swarm(
        "serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "0:2", "--device", "cuda", "--insecure"
    )
    assert proc.returncode == 2
    *warning, line = proc.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].endswith("--insecure: plaintext, no certificates; " + INSECURE_WARNING)
    assert line.startswith("fedswarm swarm: error: --device cuda: no CUDA GPU is usable here")
    assert line.endswith("use --device cpu")


@pytest.mark.processes
def test_unknown_device_is_one_line():
    proc = _swarm(
        "serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "0:2", "--device", "tpu", "--insecure"
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == "fedswarm swarm: error: --device 'tpu': expected one of auto, cpu, cuda"
    )


@pytest.mark.processes
def test_a_swarm_command_without_tls_or_insecure_exits_2_in_one_line():
    proc = _swarm("registry", "--port", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedswarm swarm: error: TLS is required: missing --tls-ca, --tls-cert, --tls-key (issue certificates "
        "with `fedswarm certs --issue`), or --insecure on a trusted machine"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "0:2"],
        ["generate", "--registry", "127.0.0.1:9", "hello"],
        ["perplexity", "--registry", "127.0.0.1:9", "--data", "diabetes"],
        ["api", "--registry", "127.0.0.1:9", "--port", "0"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_swarm_command_needs_tls_or_insecure(argv, capsys):
    from fedswarm.common.cli import main

    assert main(["swarm", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedswarm swarm: error: TLS is required: missing --tls-ca, --tls-cert, --tls-key (issue certificates "
        "with `fedswarm certs --issue`), or --insecure on a trusted machine"
    ]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA with a server and a client certificate, and a second CA's server certificate."""
    from fedswarm.common.security.certificates import issue_certificate, make_certificates

    root, other = tmp_path_factory.mktemp("ca"), tmp_path_factory.mktemp("other-ca")
    make_certificates(root, ["127.0.0.1"])
    make_certificates(other, ["127.0.0.1"])
    issue_certificate(root, "server", "s1", ["127.0.0.1"])
    issue_certificate(other, "server", "s1", ["127.0.0.1"])
    return root, other


def test_bad_tls_files_are_one_line(certs, capsys):
    from fedswarm.common.cli import main

    root, other = certs
    ok = ["--tls-ca", str(root / "ca.crt"), "--tls-cert", str(root / "s1.pem"), "--tls-key", str(root / "s1.key")]
    cases = {
        "--insecure and --tls-ca, --tls-cert, --tls-key exclude each other: drop one": [*ok, "--insecure"],
        "TLS is required: missing --tls-key (issue certificates with `fedswarm certs --issue`), or --insecure "
        "on a trusted machine": ok[:4],
        f"--tls-cert {other / 's1.pem'} was not issued by --tls-ca {root / 'ca.crt'} (InvalidSignature)": [
            *ok[:2], "--tls-cert", str(other / "s1.pem"), "--tls-key", str(other / "s1.key")
        ],
        f"--tls-key {other / 's1.key'} is not the key of --tls-cert {root / 's1.pem'}": [
            *ok[:4], "--tls-key", str(other / "s1.key")
        ],
        f"--tls-ca {root / 's1.key'}: not a PEM certificate": ["--tls-ca", str(root / "s1.key"), *ok[2:]],
        "--deny: 'abc' is not a SHA-256 certificate fingerprint (64 hex digits)": [*ok, "--deny", "abc"],
        "--deny needs server certificates: it cannot apply with --insecure": ["--insecure", "--deny", "ab" * 32],
    }  # fmt: skip
    for message, args in cases.items():
        assert main(["swarm", "registry", "--port", "0", *args]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"fedswarm swarm: error: {message}"], args


@pytest.mark.processes
def test_missing_adapter_folder_is_one_line(tmp_path):
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--blocks", "0:2", "--adapter", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedswarm swarm: error: --adapter {str(tmp_path)!r}: not a PEFT adapter folder "
        "(missing adapter_config.json, adapter_model.safetensors)"
    ]


@pytest.mark.processes
def test_adapter_name_given_twice_is_one_line(tmp_path):
    args = ["--adapter", f"fed={tmp_path}/a", "--adapter", f"fed={tmp_path}/b"]
    proc = _swarm("serve", "--registry", "127.0.0.1:9", "--blocks", "0:2", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedswarm swarm: error: --adapter 'fed={tmp_path}/b': adapter name 'fed' is given twice"
    ]


@pytest.mark.processes
def test_building_the_cli_imports_neither_torch_nor_grpc():
    code = (
        "import sys, fedswarm.common.cli as cli; cli.build_parser();"
        "print([m for m in ('torch', 'grpc', 'transformers', 'google.protobuf') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.processes
def test_api_with_an_unreachable_registry_is_one_line():
    proc = _swarm("api", "--registry", "127.0.0.1:1", "--port", "0", "--insecure")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == "fedswarm swarm: error: registry unreachable: 127.0.0.1:1 (UNAVAILABLE)"
    )


@pytest.mark.processes
def test_api_bad_concurrency_is_one_line():
    proc = _swarm("api", "--registry", "127.0.0.1:1", "--concurrency", "0", "--insecure")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fedswarm swarm: error: --concurrency must be >= 1, got 0"]


def test_token_authentication_needs_a_token_and_tls(certs, capsys, monkeypatch):
    from fedswarm.common.cli import main

    monkeypatch.delenv("FEDSWARM_SWARM_TOKEN", raising=False)
    root, _ = certs
    tls = ["--tls-ca", str(root / "ca.crt"), "--tls-cert", str(root / "s1.pem"), "--tls-key", str(root / "s1.key")]
    serve = ["swarm", "serve", "--registry", "127.0.0.1:9", "--model", "tiny", "--blocks", "0:2", *tls]
    cases = {
        "--client-auth token needs the swarm token (--token or $FEDSWARM_SWARM_TOKEN)": [
            *serve, "--client-auth", "token"
        ],
        "--client-auth 'any': choose certificate or token": [*serve, "--client-auth", "any"],
        "--client-port needs TLS and the swarm token (--token or $FEDSWARM_SWARM_TOKEN)": [
            "swarm", "registry", *tls, "--client-port", "0"
        ],
        "TLS is required: missing --tls-cert, --tls-key (issue certificates with `fedswarm certs --issue`), or "
        "--insecure on a trusted machine": ["swarm", "generate", "--registry", "127.0.0.1:9", "--tls-ca", tls[1], "hi"],
    }  # fmt: skip
    for message, argv in cases.items():
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"fedswarm swarm: error: {message}"], argv


def test_the_http_api_needs_keys_for_its_applications(certs, capsys, monkeypatch):
    from fedswarm.common.cli import main

    monkeypatch.delenv("FEDSWARM_SWARM_TOKEN", raising=False)
    monkeypatch.delenv("FEDSWARM_API_KEY", raising=False)
    root, _ = certs
    tls = ["--tls-ca", str(root / "ca.crt"), "--tls-cert", str(root / "s1.pem"), "--tls-key", str(root / "s1.key")]
    api = ["swarm", "api", "--registry", "127.0.0.1:9", "--port", "0", *tls]
    assert main(api) == 2
    assert main([*api, "--api-key", " "]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedswarm swarm: error: the HTTP API needs --api-key KEY (or $FEDSWARM_API_KEY) for its applications' bearer "
        "tokens, or --insecure on a trusted machine",
        "fedswarm swarm: error: --api-key: an empty key would let every request in",
    ]
