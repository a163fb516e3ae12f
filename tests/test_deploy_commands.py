"""The deployment commands without a network: certificates, node keys, Flower command lines, errors."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedswarm.common.cli import main


def test_certs_make_a_ca_that_verifies_the_server_certificate_for_its_hosts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    assert main(["certs", "--out", str(tmp_path), "--host", "coord.example.org", "10.0.0.5"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert names == {"coord.example.org", "10.0.0.5", "127.0.0.1", "localhost"}
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0  # private keys: owner only


def test_node_key_is_an_openssh_p384_pair_flower_accepts(tmp_path, capsys):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    assert main(["node-key", "--out", str(tmp_path), "--name", "lab-3"]) == 0
    private = load_ssh_private_key((tmp_path / "lab-3").read_bytes(), password=None)
    public = load_ssh_public_key((tmp_path / "lab-3.pub").read_bytes())
    assert private.curve.name == public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    capsys.readouterr()
    assert main(["node-key", "--out", str(tmp_path), "--name", "lab-3"]) == 2  # never overwrites a key
    assert "already exists" in capsys.readouterr().err


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    cases = [
        (["node", "--coordinator", "h:1", "--data", str(tmp_path / "none.jsonl"), "--insecure"], "no such file"),
        (["coordinator", "--run-dir", str(tmp_path), "--auth-keys", str(tmp_path)], "--certs DIR is needed"),
        (["coordinator", "--run-dir", str(tmp_path)], "--auth-keys DIR is needed"),
        (["run", "--federation", "nowhere", "--flwr-home", str(tmp_path)], "no such SuperLink connection"),
        (["run", "--federation", "x", "--flwr-home", str(tmp_path), "--coordinator", "h:1"], "--root-cert"),
        (["run", "--federation", "x", "--flwr-home", str(tmp_path), "--insecure", "--coordinator", "h:1",
          "--min-clients", "9", "--clients", "3"], "--min-clients must be within"),
    ]  # fmt: skip
    for argv, why in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, (argv, err)


def test_flower_command_lines(tmp_path):
    import argparse

    from fedswarm.client.trainer.launch import supernode_command
    from fedswarm.server.coordinator.launch import superlink_command

    main(["certs", "--out", str(tmp_path / "certs"), "--host", "127.0.0.1"])
    args = argparse.Namespace(host="0.0.0.0", port=9092, certs=str(tmp_path / "certs"), auth_keys="k", insecure=False)
    link = superlink_command(args, tmp_path)
    assert Path(link[0]).name == "flower-superlink" and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-ca-certfile") + 1].endswith("ca.crt") and "--insecure" not in link
    data = tmp_path / "my data.jsonl"
    data.write_text("{}\n")
    main(["node-key", "--out", str(tmp_path), "--name", "n"])
    node = argparse.Namespace(
        coordinator="coord:9092", data=str(data), lora_rank=16, insecure=False,
        root_cert=str(tmp_path / "certs" / "ca.crt"), auth_key=str(tmp_path / "n"), cold=True, poll_interval=0.5,
    )  # fmt: skip
    cmd = supernode_command(node, 9200)
    assert Path(cmd[0]).name == "flower-supernode"  # --cold: Flower's SuperNode as it is
    config = cmd[cmd.index("--node-config") + 1]
    assert config == f'data-path="{data.resolve()}" lora-rank=16'  # TOML values, the path quoted
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str((tmp_path / "n").resolve())
    warm = supernode_command(argparse.Namespace(**{**vars(node), "cold": False, "poll_interval": 0.25}), 9200)
    assert warm[1:5] == ["-m", "fedswarm.client.trainer.supernode", "--poll-interval", "0.25"]
    assert warm[5:] == cmd[1:]  # the same Flower arguments, TLS and node key included


def test_warm_supernode_caps_flowers_idle_sleeps(monkeypatch):
    import time

    from fedswarm.client.trainer.supernode import _ShortSleeps

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = _ShortSleeps(0.05)
    clock.sleep(3)  # Flower's idle wait between two pulls
    clock.sleep(0.01)  # a shorter one stays as asked
    assert slept == [0.05, 0.01]
    assert clock.monotonic is time.monotonic and clock.perf_counter is time.perf_counter  # the rest is time's


def test_run_passes_only_the_settings_given_and_the_app_knows_every_key(tmp_path):
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.flower_config import write_connection
    from fedswarm.server.coordinator.submit import app_pyproject, run_overrides

    parser = __import__("fedswarm.common.cli", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["run", "--federation", "f", "--rounds", "5", "--min-clients", "2", "--resume", "r1"])
    assert run_overrides(args) == {  # resuming: the coordinator is told which settings were typed
        "num-server-rounds": 5, "min-clients": 2, "resume": "r1", "resume-given": "min_clients,resume,rounds"
    }  # fmt: skip
    args = parser.parse_args(["run", "--federation", "f", "--rounds", "5"])
    assert run_overrides(args) == {"num-server-rounds": 5}
    app_config = app_pyproject()["tool"]["flwr"]["app"]["config"]
    assert app_config == FederationConfig().to_run_config()
    project = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == app_config  # pyproject.toml in sync, keys and defaults
    home = tmp_path / "flwr"
    write_connection(home, "lab", "coord:9092", None, insecure=True)
    write_connection(home, "prod", "c2:9092", str(_ca(tmp_path)), insecure=False)
    doc = tomllib.loads((home / "config.toml").read_text())
    assert doc["superlink"]["default"] == "lab"
    assert doc["superlink"]["prod"] == {"address": "c2:9092", "root-certificates": str(_ca(tmp_path).resolve())}


def _ca(tmp_path: Path) -> Path:
    if not (tmp_path / "c" / "ca.crt").exists():
        main(["certs", "--out", str(tmp_path / "c"), "--host", "c2"])
    return tmp_path / "c" / "ca.crt"


@pytest.mark.processes
def test_processes_stop_their_whole_tree():
    import psutil

    from fedswarm.common.processes import Processes, flower_env

    with Processes() as procs:
        # a child that starts a grandchild in a session of its own, as Flower's SuperExec is started
        code = "import subprocess, time; subprocess.Popen(['sleep', '60'], start_new_session=True); time.sleep(60)"
        parent = procs.start("tree", [sys.executable, "-c", code], flower_env(), quiet=True)
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = [parent.pid] + [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert len(tree) == 2
    time.sleep(0.2)
    alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []


@pytest.mark.processes
def test_flower_env_finds_flowers_tools_beside_this_python():
    from fedswarm.common.processes import flower_env

    env = flower_env("flwr-home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    found = subprocess.run(["sh", "-c", "command -v flower-superexec"], env=env, capture_output=True, text=True)
    assert found.stdout.strip().startswith(str(Path(sys.executable).parent))
    assert Path(env["FLWR_HOME"]).is_absolute()


@pytest.mark.parametrize("name", ["a b", "x.y", ""])
def test_connection_names_are_plain(tmp_path, name):
    from fedswarm.common.flower_config import write_connection

    with pytest.raises(ValueError, match="--federation"):
        write_connection(tmp_path, name, "h:1", None, insecure=True)


@pytest.mark.processes
def test_certs_never_replace_a_ca_unless_forced(tmp_path):
    certs = tmp_path / "certs"

    def run_certs(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "fedswarm.common.cli", "certs", "--out", str(certs), *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    first = run_certs("--host", "10.0.0.5")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert set(before) == {"ca.crt", "ca.key", "server.pem", "server.key"}
    again = run_certs("--host", "coord.example.org")
    assert again.returncode == 2 and again.stdout == ""
    err = again.stderr.strip()
    assert len(err.splitlines()) == 1 and str(certs / "ca.crt") in err and "--force" in err, err
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before  # nothing written
    forced = run_certs("--host", "coord.example.org", "--force")
    assert forced.returncode == 0, forced.stderr
    after = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert set(after) == set(before) and all(after[name] != before[name] for name in before)  # a new CA and key
    assert "coord.example.org" in forced.stdout
    assert all((certs / key).stat().st_mode & 0o077 == 0 for key in ("ca.key", "server.key"))


def test_warm_supernode_caps_flowers_reconnect_backoff(monkeypatch):
    """The wrapper's Flower settings: idle sleeps and the reconnect backoff's ceiling (Flower's own: 20 s)."""
    import sys

    import flwr.supercore.retry.grpc_retry as grpc_retry
    import flwr.supercore.retry.http_retry as http_retry
    import flwr.supernode.cli
    import flwr.supernode.start_client_internal as loop

    from fedswarm.client.trainer import supernode

    seen = {}
    monkeypatch.setattr(flwr.supernode.cli, "flower_supernode", lambda: seen.update(argv=list(sys.argv)))
    for retry in (grpc_retry, http_retry):  # restored after the test, as sys.argv and the loop's clock
        monkeypatch.setattr(retry, "MAX_RETRY_DELAY", retry.MAX_RETRY_DELAY)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(loop, "time", loop.time)
    assert http_retry.MAX_RETRY_DELAY == 20
    assert supernode.main(["--poll-interval", "0.25", "--superlink", "c:1"]) == 0
    assert seen["argv"] == ["flower-supernode", "--superlink", "c:1"]
    assert http_retry.MAX_RETRY_DELAY == supernode.RECONNECT_MAX_DELAY and loop.time.longest == 0.25
    waits = http_retry.exponential(max_delay=http_retry.MAX_RETRY_DELAY)
    assert max(next(waits) for _ in range(10)) <= supernode.RECONNECT_MAX_DELAY
