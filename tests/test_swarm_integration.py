"""A real swarm on 127.0.0.1: registries and block servers as separate processes, mutual TLS and a token.

Layout (tiny model, 4 blocks), all processes started at once to share the start-up cost:
  reg1: a[0:2] b[2:3] c[3:4] (base)  +  p1[0:1] p2[1:3] p3[3:4] (with a LoRA adapter)
        x: a server whose certificate names 127.0.0.2, not the 127.0.0.1 it announces: refused
  reg2: a b c  +  v[2:4] (announces a huge throughput, so routes go a -> v; killed mid-generation)
  reg3: a  +  w[2:4] (no replica; killed mid-generation)
  reg4 (--deny-file): a b c  +  d[2:4] (its own certificate, a huge throughput; denied mid-generation)
  reg5 (--client-port: clients list with the token, no certificate): t[0:4] (--client-auth token)
Certificates come from `fedswarm certs`: one CA; the registries share certificate "registry", the
servers "blocks" (d has its own, x one for 127.0.0.2); clients use the client certificate "app".
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from fedswarm.client.swarm.client import SwarmClient
from fedswarm.client.swarm.head import load_head
from fedswarm.client.swarm.model import SwarmModel
from fedswarm.client.swarm.routing import NoRouteError
from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import load_model, parse_model
from fedswarm.common.processes import free_port
from fedswarm.common.security.transport import Security, open_channel
from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from tests.conftest import assert_no_leftovers
from tests.swarm_support import (
    FORKSERVER,
    NEW_TOKENS,
    PROMPT,
    TOKEN,
    Procs,
    local_greedy,
    make_adapter,
    noop,
    roundoff_tol,
    run_cli,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Certs:
    """Files from `fedswarm certs` (CA in ``folder``) and the fingerprints of the issued certificates."""

    folder: Path
    fingerprints: dict[str, str]

    def args(self, name: str) -> list[str]:
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        return ["--tls-ca", str(self.folder / "ca.crt"), "--tls-cert", str(cert), "--tls-key", str(key)]

    def security(self, name: str, token: str = TOKEN) -> Security:
        ca, cert, key = (Path(p) for p in self.args(name)[1::2])
        return Security(token=token, tls_ca=ca, tls_cert=cert, tls_key=key)


def _make_certs(folder: Path) -> Certs:
    """The federation's CA and the swarm's certificates, issued as a user would (plus another CA's)."""
    from fedswarm.common.security.certificates import issue_certificate, make_certificates

    make_certificates(folder, ["127.0.0.1"])
    make_certificates(folder / "other", ["127.0.0.1"])
    issued = {
        "registry": issue_certificate(folder, "server", "registry", ["127.0.0.1", "localhost"]),
        "blocks": issue_certificate(folder, "server", "blocks", ["127.0.0.1"]),
        "d": issue_certificate(folder, "server", "d", ["127.0.0.1"]),
        "x": issue_certificate(folder, "server", "x", ["127.0.0.2"]),
        "app": issue_certificate(folder, "client", "app", []),
        "stranger": issue_certificate(folder / "other", "server", "stranger", ["127.0.0.1"]),
    }
    (folder / "stranger.pem").symlink_to(folder / "other" / "stranger.pem")
    (folder / "stranger.key").symlink_to(folder / "other" / "stranger.key")
    return Certs(folder, {name: i.fingerprint for name, i in issued.items()})


def _make_adapter(folder: Path) -> Path:
    return make_adapter(folder, 0, b_seed=1)


@dataclass
class Swarm:
    procs: Procs
    security: Security
    adapter: Path
    certs: Certs
    deny_file: Path

    def registry(self, name: str) -> list[str]:
        return [self.procs.addresses[name]]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swarm")
    warm = FORKSERVER.Process(target=noop)  # the forkserver imports torch while we make certificates
    warm.start()
    certs = _make_certs(folder / "certs")
    adapter = _make_adapter(folder / "adapter")
    deny_file = folder / "denied.txt"
    deny_file.write_text("# fingerprints of denied servers\n")
    procs = Procs(folder)
    try:
        token_port = free_port()
        for reg in ("reg1", "reg2", "reg3", "reg4", "reg5"):  # fixed ports: servers start alongside (they retry)
            port = free_port()
            extra = {"reg4": ["--deny-file", str(deny_file)], "reg5": ["--client-port", str(token_port)]}.get(reg, [])
            procs.start(reg, "registry", "--port", str(port), *certs.args("registry"), *extra)
            procs.addresses[reg] = f"127.0.0.1:{port}"
        r1, r2, r3, r4, r5 = (("--registry", procs.addresses[r]) for r in ("reg1", "reg2", "reg3", "reg4", "reg5"))
        procs.addresses["reg5-clients"] = f"127.0.0.1:{token_port}"
        common = ["--model", "tiny", "--threads", "1", "--ttl", "30"]
        blocks = certs.args("blocks")
        servers = {
            "a": [*r1, *r2, *r3, *r4, "--blocks", "0:2", *blocks],
            "b": [*r1, *r2, *r4, "--blocks", "2:3", *blocks],
            "c": [*r1, *r2, *r4, "--blocks", "3:4", *blocks],
            "v": [*r2, "--blocks", "2:4", "--throughput", "1e9", *blocks],
            "w": [*r3, "--blocks", "2:4", *blocks],
            "d": [*r4, "--blocks", "2:4", "--throughput", "1e9", *certs.args("d")],
            "x": [*r1, "--blocks", "0:4", "--throughput", "1e9", *certs.args("x")],
            "t": [*r5, "--blocks", "0:4", "--client-auth", "token", *blocks],
            "p1": [*r1, "--blocks", "0:1", "--adapter", str(adapter), *blocks],
            "p2": [*r1, "--blocks", "1:3", "--adapter", str(adapter), *blocks],
            "p3": [*r1, "--blocks", "3:4", "--adapter", str(adapter), *blocks],
        }
        for name, args in servers.items():  # "a" through the installed entry point, the others forked
            (procs.start if name == "a" else procs.fork)(name, "serve", *args, *common)
        procs.wait_ready("reg1", "reg2", "reg3", "reg4", "reg5", *servers)
        security = certs.security("app")
        expected = {"reg1": "abcp", "reg2": "abcv", "reg3": "aw", "reg4": "abcd", "reg5": "t"}
        _wait_listed(procs, security, expected, servers)
        yield Swarm(procs, security, adapter, certs, deny_file)
    finally:
        procs.stop_all()
        warm.join(timeout=5)
    assert_no_leftovers(procs.sup)


def _wait_listed(procs: Procs, security: Security, expected: dict[str, str], servers: dict) -> None:
    """Wait until each registry lists its servers (they may have started before the registry)."""
    from fedswarm.client.swarm.discovery import list_servers

    deadline = time.monotonic() + 30
    for reg, initials in expected.items():
        want = {procs.addresses[name] for name in servers if name[0] in initials}
        while {s.address for s in list_servers([procs.addresses[reg]], security)} != want:
            assert time.monotonic() < deadline, f"{reg} does not list {sorted(want)}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def local_base():
    model = load_model("tiny")
    tokens, logits = local_greedy(model, NEW_TOKENS)
    generated = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert generated[0, len(PROMPT) :].tolist() == tokens  # the loop above is HF's greedy decoding
    return tokens, logits


def _swarm_model(swarm: Swarm, registry: str, adapter_id: str | None = "") -> tuple[SwarmClient, SwarmModel]:
    client = SwarmClient(swarm.registry(registry), swarm.security, adapter_id=adapter_id, ban_s=300)
    return client, SwarmModel(client, load_head(parse_model("tiny")))


def _assert_same(result, tokens, logits) -> None:
    assert result.tokens == tokens
    worst = max(float((a - b).abs().max()) for a, b in zip(result.logits, logits, strict=True))
    assert worst <= max(roundoff_tol(b) for b in logits), worst


def test_greedy_generation_through_three_servers_equals_local(swarm, local_base):
    client, model = _swarm_model(swarm, "reg1")
    try:
        routes = []
        result = model.generate(PROMPT, NEW_TOKENS, on_token=lambda _t, s: routes.append(s.route))
    finally:
        client.close()
    addresses = swarm.procs.addresses
    assert [h.address for h in routes[0]] == [addresses["a"], addresses["b"], addresses["c"]]
    _assert_same(result, *local_base)


def test_stateless_forward_logits_equal_local(swarm):
    model = load_model("tiny")
    batch = torch.tensor([PROMPT + [7042, 30], PROMPT + [198, 198]])
    client, swarm_model = _swarm_model(swarm, "reg1")
    try:
        remote = swarm_model.logits(batch)
    finally:
        client.close()
    with torch.no_grad():
        local = model(batch).logits
        assert (remote - local).abs().max() <= roundoff_tol(local)


def test_adapter_on_the_servers_equals_local_peft_model(swarm):
    from peft import PeftModel

    from fedswarm.server.swarm.merged_adapter import adapter_id

    reference = PeftModel.from_pretrained(load_model("tiny"), swarm.adapter).eval()
    tokens, logits = local_greedy(reference, NEW_TOKENS)
    client, model = _swarm_model(swarm, "reg1", adapter_id=adapter_id(swarm.adapter))
    try:
        result = model.generate(PROMPT, NEW_TOKENS)
        route = client.plan()
    finally:
        client.close()
    addresses = swarm.procs.addresses
    assert [h.address for h in route] == [addresses["p1"], addresses["p2"], addresses["p3"]]
    _assert_same(result, tokens, logits)


def test_mixed_adapters_need_a_choice(swarm):
    with pytest.raises(FedswarmError, match="servers disagree on the adapter"):
        SwarmClient(swarm.registry("reg1"), swarm.security)


def test_server_killed_mid_generation_is_replaced_transparently(swarm, local_base):
    client, model = _swarm_model(swarm, "reg2")
    addresses = swarm.procs.addresses
    routes = []

    def kill_victim(_token, session):
        routes.append([h.address for h in session.route])
        if len(routes) == 4:
            swarm.procs.kill("v")

    try:
        result = model.generate(PROMPT, NEW_TOKENS, on_token=kill_victim)
    finally:
        client.close()
    assert routes[0] == [addresses["a"], addresses["v"]]
    assert routes[-1] == [addresses["a"], addresses["b"], addresses["c"]]
    _assert_same(result, *local_base)


def test_server_killed_without_replica_names_the_missing_blocks(swarm):
    client, model = _swarm_model(swarm, "reg3")

    def kill_w(_token, session):
        if session.length == len(PROMPT) + 2:
            swarm.procs.kill("w")

    try:
        with pytest.raises(NoRouteError, match=r"no live server holds blocks 2-3") as info:
            model.generate(PROMPT, NEW_TOKENS, on_token=kill_w)
    finally:
        client.close()
    assert info.value.missing == [(2, 4)]


def test_client_merges_registries_and_skips_a_dead_one(swarm):
    from fedswarm.client.swarm.discovery import list_servers

    addresses = swarm.procs.addresses
    dead = f"127.0.0.1:{free_port()}"
    listed = [s.address for s in list_servers([dead, addresses["reg1"], addresses["reg3"]], swarm.security)]
    assert len(listed) == len(set(listed))  # "a" announces to both, and appears once
    assert {addresses[n] for n in ("a", "b", "c", "p1", "p2", "p3")} <= set(listed)


def test_requests_without_a_valid_token_are_refused(swarm):
    for token in ("", "wrong"):
        with pytest.raises(FedswarmError, match=r"registry .* refused the swarm token"):
            SwarmClient(swarm.registry("reg1"), swarm.certs.security("app", token=token))
    # straight to a block server, past the registry
    client, model = _swarm_model(swarm, "reg1")
    try:
        object.__setattr__(client, "security", swarm.certs.security("app", token="wrong"))
        with pytest.raises(FedswarmError, match=r"server 127\.0\.0\.1:\d+ refused the swarm token"):
            model.generate(PROMPT, 2)
    finally:
        client.close()


def test_clients_without_a_certificate_of_the_federation_cannot_connect(swarm):
    for security in (
        Security(token=TOKEN),  # plaintext
        Security(token=TOKEN, tls_ca=swarm.security.tls_ca),  # TLS, no client certificate
        swarm.certs.security("stranger"),  # a certificate from another CA
    ):
        with pytest.raises(FedswarmError, match="registry unreachable"):
            SwarmClient(swarm.registry("reg1"), security)


def test_only_a_server_certificate_naming_the_address_may_announce(swarm):
    from fedswarm.client.swarm.discovery import list_servers
    from fedswarm.server.swarm.announcer import Announcer

    addresses, certs = swarm.procs.addresses, swarm.certs
    listed = {s.address: s for s in list_servers(swarm.registry("reg1"), swarm.security)}
    assert addresses["x"] not in listed  # a real server whose certificate names 127.0.0.2
    assert (listed[addresses["a"]].identity, listed[addresses["a"]].identity_name) == (
        certs.fingerprints["blocks"],
        "blocks",
    )
    _wait_for_line(swarm.procs.folder / "x.log", f"registry {addresses['reg1']} refused this server: certificate 'x' "
                   f"names 127.0.0.2, not 127.0.0.1 (the announced address {addresses['x']})")  # fmt: skip
    reg1_log = (swarm.procs.folder / "reg1.log").read_text()
    assert f"refused announcement of {addresses['x']} from ipv4:127.0.0.1:" in reg1_log

    info = swarm_pb2.ServerInfo()
    info.CopyFrom(listed[addresses["b"]])
    info.address = "127.0.0.1:1"  # a free address: only the certificate decides
    refusals = {
        "app": (grpc.StatusCode.PERMISSION_DENIED, "certificate 'app' is a client certificate"),
        "x": (grpc.StatusCode.PERMISSION_DENIED, "certificate 'x' names 127.0.0.2, not 127.0.0.1"),
        "stranger": (grpc.StatusCode.UNAVAILABLE, ""),  # another CA: the handshake fails
        "plaintext": (grpc.StatusCode.UNAVAILABLE, ""),
        "token, no certificate": (grpc.StatusCode.UNAVAILABLE, ""),
    }
    uncertified = {"plaintext": Security(token=TOKEN), "token, no certificate": Security(TOKEN, swarm.security.tls_ca)}
    for who, (code, message) in refusals.items():
        security = uncertified.get(who) or certs.security(who)
        with pytest.raises(grpc.RpcError) as refused:
            Announcer([addresses["reg1"]], info, 30.0, security).announce_once(addresses["reg1"], 30.0)
        assert refused.value.code() == code and message in (refused.value.details() or ""), who
    # a server certificate may not take over another server's live entry, even for a host it names
    info.address = addresses["b"]
    with pytest.raises(grpc.RpcError, match=f"{addresses['b']} is announced by another certificate"):
        Announcer([addresses["reg1"]], info, 30.0, certs.security("d")).announce_once(addresses["reg1"], 30.0)
    assert "127.0.0.1:1" not in {s.address for s in list_servers(swarm.registry("reg1"), swarm.security)}


def test_client_refuses_a_server_whose_certificate_does_not_match_its_address(swarm, local_base):
    """A registry that lists whatever it is told (here: one in this process that checks no identity)
    sends the client to server x, whose certificate names 127.0.0.2: the client's handshake refuses
    it, bans it, and routes through a, b, c instead."""
    from concurrent import futures

    from fedswarm.client.swarm.discovery import list_servers
    from fedswarm.common.security.transport import bind_server
    from fedswarm.server.swarm.registry import RegistryServicer, RegistryTable

    addresses = swarm.procs.addresses
    table = RegistryTable()
    for info in list_servers(swarm.registry("reg4"), swarm.security):
        if info.address != addresses["d"]:
            table.announce(info, 60.0)
    forged = swarm_pb2.ServerInfo()
    forged.CopyFrom(
        next(i for i in list_servers(swarm.registry("reg1"), swarm.security) if i.address == addresses["a"])
    )
    forged.address, forged.start, forged.end, forged.throughput = addresses["x"], 0, 4, 1e12
    table.announce(forged, 60.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    swarm_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(table), server)
    port = bind_server(server, "127.0.0.1", 0, swarm.certs.security("registry"))
    server.start()
    client = SwarmClient([f"127.0.0.1:{port}"], swarm.security, adapter_id="", ban_s=300)
    try:
        assert [h.address for h in client.plan()] == [addresses["x"]]
        routes: list[list[str]] = []
        model = SwarmModel(client, load_head(parse_model("tiny")))
        result = model.generate(PROMPT, NEW_TOKENS, on_token=lambda _t, s: routes.append([h.address for h in s.route]))
        assert addresses["x"] in client.banned()
    finally:
        client.close()
        server.stop(0)
    assert routes[0] == [addresses["a"], addresses["b"], addresses["c"]]
    _assert_same(result, *local_base)


def test_a_denied_server_is_dropped_at_once_and_the_client_reroutes(swarm, local_base):
    from fedswarm.server.swarm.announcer import Announcer

    addresses = swarm.procs.addresses
    client = SwarmClient(swarm.registry("reg4"), swarm.security, adapter_id="", ban_s=300, relist_s=0.0)
    model = SwarmModel(client, load_head(parse_model("tiny")))
    routes: list[list[str]] = []

    def deny_d(_token, session):
        routes.append([h.address for h in session.route])
        if len(routes) == 4:
            fingerprint = swarm.certs.fingerprints["d"]
            swarm.deny_file.write_text(f"# revoked\n{':'.join(fingerprint[i : i + 2] for i in range(0, 64, 2))}\n")

    try:
        result = model.generate(PROMPT, NEW_TOKENS, on_token=deny_d)
    finally:
        client.close()
    assert routes[0] == [addresses["a"], addresses["d"]]
    assert routes[-1] == [addresses["a"], addresses["b"], addresses["c"]]
    assert client.replays == 1
    _assert_same(result, *local_base)
    assert f"dropped {addresses['d']}: certificate 'd'" in (swarm.procs.folder / "reg4.log").read_text()
    info = swarm_pb2.ServerInfo(address=addresses["d"], model_id="x", start=2, end=4, num_blocks=4, throughput=1.0)
    with pytest.raises(grpc.RpcError, match=f"certificate 'd' \\({swarm.certs.fingerprints['d']}\\) is denied"):
        Announcer([addresses["reg4"]], info, 30.0, swarm.certs.security("d")).announce_once(addresses["reg4"], 30.0)


def test_a_token_client_without_a_certificate_uses_servers_that_take_the_token(swarm, local_base):
    """reg5's client port and server t take the swarm token in place of a client certificate (TLS still
    checks the servers); the token lets that client list and generate, never announce, and mutual-TLS
    servers still refuse it."""
    from fedswarm.server.swarm.announcer import Announcer

    addresses = swarm.procs.addresses
    token_client = Security(token=TOKEN, tls_ca=swarm.security.tls_ca)
    client = SwarmClient(swarm.registry("reg5-clients"), token_client, adapter_id="", ban_s=300)
    try:
        assert [h.address for h in client.plan()] == [addresses["t"]]
        result = SwarmModel(client, load_head(parse_model("tiny"))).generate(PROMPT, NEW_TOKENS)
    finally:
        client.close()
    _assert_same(result, *local_base)
    info = swarm_pb2.ServerInfo(address="127.0.0.1:1", model_id="x", start=0, end=4, num_blocks=4, throughput=1.0)
    with pytest.raises(grpc.RpcError, match="announcing needs a server certificate from the federation's CA"):
        Announcer([addresses["reg5-clients"]], info, 30.0, token_client).announce_once(addresses["reg5-clients"], 30.0)
    with pytest.raises(FedswarmError, match=r"registry 127\.0\.0\.1:\d+ refused the swarm token"):
        SwarmClient(swarm.registry("reg5-clients"), Security(token="wrong", tls_ca=swarm.security.tls_ca))
    with pytest.raises(grpc.RpcError) as refused:  # server a wants a client certificate
        stub = swarm_pb2_grpc.BlockServerStub(open_channel(addresses["a"], token_client))
        stub.Info(swarm_pb2.InfoRequest(protocol_version=1), timeout=10, metadata=token_client.metadata())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _wait_for_line(path: Path, line: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while line not in path.read_text():
        assert time.monotonic() < deadline, f"{path.name} does not say {line!r}:\n{path.read_text()}"
        time.sleep(0.2)


def test_unreachable_registry_is_one_clear_error():
    with pytest.raises(FedswarmError, match=r"registry unreachable: 127\.0\.0\.1:1 \(UNAVAILABLE\)"):
        SwarmClient(["127.0.0.1:1"], Security())


def test_cli_generate_and_perplexity_through_the_swarm(swarm, local_base, labelled_file, tokenizer, tmp_path):
    from fedswarm.common.batches import encode
    from fedswarm.common.data import load_examples

    client_args = ["--registry", swarm.procs.addresses["reg1"], "--adapter-id", "", "--threads", "1"]
    client_args += swarm.certs.args("app")
    text = tokenizer.decode(PROMPT)
    commands = {
        "generate": ["swarm", "generate", *client_args, text, "--max-new-tokens", "6"],
        "perplexity": ["swarm", "perplexity", *client_args, "--data", str(labelled_file), "--max-samples", "6"],
    }
    runs = {}
    for name, argv in commands.items():  # forked like the servers, to skip re-importing torch
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        runs[name] = FORKSERVER.Process(target=run_cli, args=(str(out), argv, str(err)))
        runs[name].start()
        swarm.procs.sup.adopt(name, runs[name].pid)  # stopped, and checked, with the swarm
    for run in runs.values():
        run.join(timeout=120)
    read = {name: ((tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()) for name in runs}

    assert runs["generate"].exitcode == 0, read["generate"]
    assert read["generate"][0] == tokenizer.decode(local_base[0][:6]) + "\n"
    assert "6 tokens" in read["generate"][1] and "over 3 hops" in read["generate"][1]

    assert runs["perplexity"].exitcode == 0, read["perplexity"]
    model = load_model("tiny")
    nll, count = 0.0, 0
    with torch.no_grad():
        for example in load_examples(str(labelled_file), 6):
            encoded = encode(tokenizer, example, 128)
            logprobs = torch.log_softmax(model(torch.tensor([encoded.input_ids])).logits[0], dim=-1)
            for pos in range(encoded.prompt_len, len(encoded.input_ids)):
                nll -= float(logprobs[pos - 1, encoded.input_ids[pos]])
                count += 1
    match = re.fullmatch(r"perplexity ([\d.]+) over (\d+) answer tokens of 6 records", read["perplexity"][0].strip())
    assert match and int(match.group(2)) == count
    assert float(match.group(1)) == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-5)
