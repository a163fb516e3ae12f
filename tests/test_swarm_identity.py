"""The registry's identity rules without a network: who may announce what, how often, and revocation."""

from __future__ import annotations

import pytest

from fedswarm.common.errors import FedswarmError, InputError
from fedswarm.common.security.identity import Identity, identity_of_pem, normalise_fingerprint
from fedswarm.protos import swarm_pb2
from fedswarm.server.swarm.registry import (
    ANNOUNCE_BURST,
    ANNOUNCE_RATE,
    MAX_ENTRIES_PER_IDENTITY,
    DenyList,
    RefusedError,
    RegistryTable,
)

A = Identity("a" * 64, "server-a", frozenset({"127.0.0.1"}), True)
B = Identity("b" * 64, "server-b", frozenset({"127.0.0.1"}), True)


def _info(address: str) -> swarm_pb2.ServerInfo:
    return swarm_pb2.ServerInfo(address=address, model_id="tiny", start=0, end=2, num_blocks=4, throughput=1.0)


def test_entries_carry_the_identity_and_only_it_may_refresh_or_withdraw():
    now = [0.0]
    table = RegistryTable(clock=lambda: now[0])
    table.announce(_info("127.0.0.1:1"), 10.0, A)
    (entry,) = table.live()
    assert (entry.identity, entry.identity_name) == ("a" * 64, "server-a")
    for ttl in (10.0, 0.0):  # neither a refresh nor a withdrawal by another certificate
        lapses = r"127\.0\.0\.1:1 is announced by another certificate until its entry lapses \(in 10 s\)"
        with pytest.raises(RefusedError, match=lapses):
            table.announce(_info("127.0.0.1:1"), ttl, B)
    now[0] = 10.5  # lapsed: the address is free again
    table.announce(_info("127.0.0.1:1"), 10.0, B)
    assert [e.identity_name for e in table.live()] == ["server-b"]
    table.announce(_info("127.0.0.1:1"), 0.0, B)
    assert table.live() == []


def test_announcements_are_rate_limited_per_identity():
    now = [0.0]
    table = RegistryTable(clock=lambda: now[0])
    for _ in range(ANNOUNCE_BURST):
        table.announce(_info("127.0.0.1:1"), 10.0, A)
    with pytest.raises(RefusedError, match=r"too many announcements \(at most 2/s\)") as refused:
        table.announce(_info("127.0.0.1:1"), 10.0, A)
    assert refused.value.kind == "flood"
    table.announce(_info("127.0.0.1:2"), 10.0, B)  # another identity has its own bucket
    now[0] = 1.0 / ANNOUNCE_RATE  # one token back
    table.announce(_info("127.0.0.1:1"), 10.0, A)
    with pytest.raises(RefusedError, match="too many announcements"):
        table.announce(_info("127.0.0.1:1"), 10.0, A)


def test_one_identity_holds_a_bounded_number_of_entries():
    now = [0.0]
    table = RegistryTable(clock=lambda: now[0])
    for port in range(1, MAX_ENTRIES_PER_IDENTITY + 1):
        now[0] += 1.0  # within the rate limit
        table.announce(_info(f"127.0.0.1:{port}"), 600.0, A)
    now[0] += 1.0
    with pytest.raises(RefusedError, match=f"one certificate may hold at most {MAX_ENTRIES_PER_IDENTITY} entries"):
        table.announce(_info("127.0.0.1:9999"), 600.0, A)
    table.announce(_info("127.0.0.1:9999"), 600.0, B)


def test_a_deny_file_is_reread_when_it_changes(tmp_path, caplog):
    path = tmp_path / "denied.txt"
    path.write_text("# none yet\n")
    table = RegistryTable(deny=DenyList([], path))
    table.announce(_info("127.0.0.1:1"), 10.0, A)
    table.announce(_info("127.0.0.1:2"), 10.0, B)
    colons = ":".join("AA" for _ in range(32))  # upper case with colons, as openssl prints it
    path.write_text(f"{colons}  # server-a, revoked\nnot-a-fingerprint\n")
    assert [e.address for e in table.live()] == ["127.0.0.1:2"]  # dropped at once
    assert "line 2 skipped: 'not-a-fingerprint' is not a SHA-256 certificate fingerprint" in caplog.text
    with pytest.raises(RefusedError, match=f"certificate 'server-a' \\({'a' * 64}\\) is denied"):
        table.announce(_info("127.0.0.1:1"), 10.0, A)
    path.unlink()  # a deleted file denies nothing more
    table.announce(_info("127.0.0.1:1"), 10.0, A)
    assert len(table.live()) == 2


def test_deny_list_errors_at_start_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="'xyz' is not a SHA-256 certificate fingerprint"):
        DenyList(["xyz"])
    (tmp_path / "bad.txt").write_text("\n" + "g" * 64 + "\n")
    with pytest.raises(FedswarmError, match=r"bad\.txt line 2: 'g{64}' is not a SHA-256"):
        DenyList([], tmp_path / "bad.txt")
    with pytest.raises(FedswarmError, match=r"--deny-file .*missing\.txt: no such file"):
        DenyList([], tmp_path / "missing.txt")
    assert normalise_fingerprint(" AB" + ":CD" * 31 + " ") == "ab" + "cd" * 31


def test_issued_certificates_carry_their_identity(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from fedswarm.common.security.certificates import issue_certificate, make_certificates

    make_certificates(tmp_path, ["coord.example.org"])
    server = issue_certificate(tmp_path, "server", "blocks-a", ["10.0.0.5", "Blocks.Example.org"])
    client = issue_certificate(tmp_path, "client", "app", [])
    pem = server.cert.read_bytes()
    identity = identity_of_pem(pem)
    assert (
        identity.fingerprint
        == server.fingerprint
        == x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
    )
    assert (identity.name, identity.hosts, identity.may_serve) == ("blocks-a", {"10.0.0.5", "blocks.example.org"}, True)
    assert identity.covers("blocks.example.org.") and identity.covers("10.0.0.5") and not identity.covers("10.0.0.6")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate(pem).verify_directly_issued_by(ca)
    assert not identity_of_pem(client.cert.read_bytes()).may_serve
    assert oct(server.key.stat().st_mode & 0o777) == "0o600"

    errors = {
        "already exists; --force issues 'app' again": ("client", "app", []),
        "a server certificate needs the host names or IP addresses it will announce": ("server", "s", []),
        "--name 'ca': letters, digits": ("server", "ca", ["h"]),
        "--issue 'root': choose one of server, client": ("root", "r", []),
    }
    for message, (kind, name, hosts) in errors.items():
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            issue_certificate(tmp_path, kind, name, hosts)
    with pytest.raises(InputError, match=r"no CA in .* \(ca\.crt and ca\.key\): make one with `fedswarm certs"):
        issue_certificate(tmp_path / "elsewhere", "client", "app", [])
    issue_certificate(tmp_path, "client", "app", [], force=True)


def test_certs_command_issues_swarm_certificates(tmp_path, capsys):
    from fedswarm.common.cli import main

    out = str(tmp_path)
    assert main(["certs", "--out", out, "--host", "coord.example.org"]) == 0
    assert main(["certs", "--out", out, "--issue", "server", "--name", "blocks-a", "--host", "10.0.0.5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    fingerprint = identity_of_pem((tmp_path / "blocks-a.pem").read_bytes()).fingerprint
    assert printed[-2:] == [
        f"server certificate 'blocks-a' for 10.0.0.5: {tmp_path / 'blocks-a.pem'} (+ blocks-a.key, keep private)",
        f"SHA-256 fingerprint (for `fedswarm swarm registry --deny`): {fingerprint}",
    ]
    assert main(["certs", "--out", out, "--issue", "client"]) == 2
    assert main(["certs", "--out", out, "--name", "x", "--host", "h"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "fedswarm certs: error: --issue needs --name NAME (the certificate's files are NAME.pem and NAME.key)",
        "fedswarm certs: error: --name goes with --issue server|client",
    ]


def test_without_tls_each_address_has_its_own_announcement_budget():
    now = [0.0]
    table = RegistryTable(clock=lambda: now[0])
    for _ in range(ANNOUNCE_BURST):
        table.announce(_info("127.0.0.1:1"), 10.0)
    with pytest.raises(RefusedError, match="too many announcements"):
        table.announce(_info("127.0.0.1:1"), 10.0)
    table.announce(_info("127.0.0.1:2"), 10.0)  # another server of the same plaintext swarm
