"""``fedswarm certs`` and ``fedswarm coordinator``: Flower's SuperLink with TLS and node authentication.

The coordinator runs ``flower-superlink`` (HTTPS, SuperNode authentication, a SQLite
state in the run folder so node registrations and ids survive a restart) and registers
every node public key (``*.pub``) found in ``--auth-keys`` with Flower's own
``flwr supernode register``, also keys added while it runs. The ServerApp of each
submitted run works in ``--run-dir``: relative ``--out`` and ``--resume`` folders are there.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import FedswarmError
from fedswarm.common.options import add_arguments, flag, host_option, option, required

if TYPE_CHECKING:
    from fedswarm.common.processes import Supervisor

log = logging.getLogger("fedswarm")

CONNECTION = "fedswarm"  # the coordinator's own SuperLink connection, in RUN_DIR/.flwr
KEY_POLL_SECONDS = 2.0
REGISTER_TIMEOUT_S = 120.0  # one round of `flwr supernode register` calls
REGISTER_ATTEMPTS = 3


@dataclass(frozen=True, kw_only=True)
class CertsCommand:
    """``fedswarm certs``."""

    out: str = required("folder for the certificate files (with --issue: the folder holding the CA)")
    host: list[str] | None = option(
        None,
        "names or IPs peers dial: the coordinator's (127.0.0.1 and localhost are always added), or with "
        "--issue server those the swarm server listens on and announces (exactly these)",
        nargs="+",
    )
    issue: str | None = option(
        None, "issue a swarm certificate from the CA in --out: 'server' (registry or block server) or 'client'"
    )
    name: str | None = option(None, "with --issue: the certificate's name; files NAME.pem and NAME.key")
    days: int = option(365, "validity", unit="days")
    force: bool = flag("replace the files already in --out (a new CA: every node then needs the new ca.crt)")


@dataclass(frozen=True, kw_only=True)
class CoordinatorCommand:
    """``fedswarm coordinator``."""

    host: str = host_option("0.0.0.0")
    port: int = option(9092, "port of the SuperLink's HTTPS APIs (Fleet, Control)")
    certs: str | None = option(None, "folder from `fedswarm certs` (ca.crt, server.pem, server.key)")
    auth_keys: str | None = option(None, "folder of node public keys (*.pub) to register; watched while running")
    run_dir: str = option("runs", "working folder: run folders, SuperLink state and log")
    insecure: bool = flag("no TLS and no node authentication (trusted LAN only)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser(
        "certs",
        help="make the federation's CA and the coordinator's TLS certificate, or issue a swarm certificate",
        description="Writes ca.crt (give it to nodes), ca.key, server.pem and server.key (keep them); with "
        "--issue server|client --name NAME, writes NAME.pem and NAME.key signed by that CA, for a swarm "
        "registry or block server (its identity) or a swarm client. Existing files are replaced only with --force.",
    )
    add_arguments(certs, CertsCommand)
    certs.set_defaults(handler=run_certs)

    coord = sub.add_parser(
        "coordinator",
        help="run the coordinator (Flower SuperLink with TLS and node authentication)",
        description="Starts flower-superlink, registers node keys, and serves until Ctrl-C.",
    )
    add_arguments(coord, CoordinatorCommand)
    coord.set_defaults(handler=run_coordinator)


def run_certs(args: argparse.Namespace) -> int:
    from fedswarm.common.security.certificates import issue_certificate, make_certificates

    if args.issue is not None:
        if not args.name:
            raise FedswarmError("--issue needs --name NAME (the certificate's files are NAME.pem and NAME.key)")
        issued = issue_certificate(args.out, args.issue, args.name, list(args.host or []), args.days, args.force)
        covered = f" for {', '.join(args.host)}" if args.host else ""
        print(f"{args.issue} certificate {args.name!r}{covered}: {issued.cert} (+ {issued.key.name}, keep private)")
        print(f"SHA-256 fingerprint (for `fedswarm swarm registry --deny`): {issued.fingerprint}")
        return 0
    if args.name:
        raise FedswarmError("--name goes with --issue server|client")
    if not args.host:
        raise FedswarmError("--host: give at least one host name or IP address the nodes will dial")
    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    paths = make_certificates(args.out, hosts, args.days, args.force)
    print(f"CA certificate (copy to every node and to where you run `fedswarm run`): {paths.ca_cert}")
    print(f"server certificate for {', '.join(hosts)}: {paths.server_cert} (+ {paths.server_key.name}, keep private)")
    return 0


def superlink_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``flower-superlink`` command line for these options."""
    from fedswarm.common.processes import flower_tool
    from fedswarm.common.security.certificates import CertPaths

    cmd = [flower_tool("flower-superlink"), "--host", args.host, "--port", str(args.port)]
    cmd += ["--database", str(run_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
    if args.insecure:
        return [*cmd, "--insecure"]
    if not args.certs:
        raise FedswarmError("--certs DIR is needed (make it with `fedswarm certs`), or --insecure on a trusted network")
    certs = CertPaths.in_dir(args.certs)
    if missing := certs.missing():
        raise FedswarmError(f"--certs {args.certs}: missing {', '.join(p.name for p in missing)}")
    cmd += ["--ssl-ca-certfile", str(certs.ca_cert.resolve()), "--ssl-certfile", str(certs.server_cert.resolve())]
    cmd += ["--ssl-keyfile", str(certs.server_key.resolve())]
    return [*cmd, "--enable-supernode-auth"] if args.auth_keys else cmd


def run_coordinator(args: argparse.Namespace) -> int:
    from fedswarm.common.flower_config import write_connection
    from fedswarm.common.processes import Supervisor, flower_env, stop_on_sigterm, wait_for_port

    if args.auth_keys and not Path(args.auth_keys).is_dir():
        raise FedswarmError(f"--auth-keys {args.auth_keys}: not a folder")
    if args.insecure and args.auth_keys:
        raise FedswarmError("--auth-keys needs TLS (Flower refuses node authentication without it): drop --insecure")
    if not args.insecure and not args.auth_keys:
        raise FedswarmError("--auth-keys DIR is needed (node public keys), or --insecure on a trusted network")
    if args.insecure:
        log.warning("--insecure: no TLS and no node authentication; any machine that reaches the port can join")
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(args, run_dir)
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    home = run_dir / ".flwr"
    ca = None if args.insecure else str(Path(args.certs, "ca.crt"))
    config = write_connection(home, CONNECTION, f"{local}:{args.port}", ca, args.insecure)
    stop_on_sigterm()
    with Supervisor() as procs:
        link = procs.start("superlink", cmd, flower_env(), cwd=run_dir)
        wait_for_port(local, args.port, link, 60.0, "flower-superlink")
        print(f"coordinator listening on {args.host}:{args.port}; runs in {run_dir}", flush=True)
        print(f"SuperLink connection '{CONNECTION}' for flwr: {config} (FLWR_HOME={home})", flush=True)
        keys = KeyRegistrar(Path(args.auth_keys), home, procs) if args.auth_keys else None
        while link.poll() is None:
            if keys is not None:
                keys.register_new()
            time.sleep(KEY_POLL_SECONDS)
        raise FedswarmError(f"flower-superlink exited with code {link.returncode}")


class KeyRegistrar:
    """Registers each ``*.pub`` in a folder once: ``flwr supernode register`` under the coordinator's supervisor.

    A registration that fails or outlives ``timeout`` is tried again at the next poll, ``attempts``
    times in all; the coordinator itself goes on serving whatever happens. A key file written anew
    (another modification time) is registered anew.
    """

    def __init__(
        self,
        folder: Path,
        home: Path,
        procs: Supervisor,
        timeout: float = REGISTER_TIMEOUT_S,
        attempts: int = REGISTER_ATTEMPTS,
    ) -> None:
        self.folder = folder
        self.home = home
        self.procs = procs
        self.timeout = timeout
        self.attempts = attempts
        self.done: set[tuple[str, int]] = set()  # (file name, modification time): registered, or given up on
        self.failures: dict[tuple[str, int], int] = {}

    def register_new(self) -> None:
        from fedswarm.common.processes import flower_env, flower_tool, show

        started = []
        for key in sorted(self.folder.glob("*.pub")):  # in parallel: each `flwr` call spends seconds importing
            try:
                version = (key.name, key.stat().st_mtime_ns)
            except OSError:  # removed meanwhile
                continue
            if version in self.done:
                continue
            cmd = [flower_tool("flwr"), "supernode", "register", str(key.resolve()), CONNECTION, "--format", "json"]
            show(cmd, f"FLWR_HOME={self.home} ")
            env = flower_env(self.home)
            proc = self.procs.start(f"register {key.name}", cmd, env, output=subprocess.PIPE, quiet=True)
            started.append((key, version, proc))
        deadline = time.monotonic() + self.timeout
        for key, version, proc in started:
            try:
                out, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs.stop(proc, grace=5.0)
                if proc.stdout is not None:
                    proc.stdout.close()
                self._failed(key, version, f"`flwr supernode register` did not finish within {self.timeout:g} s")
                continue
            why = _report(key, proc.returncode, out)
            if why is None:
                self.done.add(version)
            else:
                self._failed(key, version, why)

    def _failed(self, key: Path, version: tuple[str, int], why: str) -> None:
        tries = self.failures[version] = self.failures.get(version, 0) + 1
        if tries < self.attempts:
            log.warning(
                "node key %s not registered (attempt %d of %d): %s; trying again", key.name, tries, self.attempts, why
            )
            return
        self.done.add(version)
        log.error(
            "gave up on node key %s after %d attempts: %s; write the key file again to retry", key.name, tries, why
        )


def _report(key: Path, code: int, output: str) -> str | None:
    """Print the outcome of one registration; ``None`` if the key is registered, else why not."""
    start = output.find("{")
    try:
        answer = json.loads(output[start:]) if start >= 0 else {}
    except ValueError:
        answer = {}
    if code == 0 and answer.get("success"):
        print(f"registered node key {key.name}: node id {answer.get('node-id')}", flush=True)
    elif "already" in output.lower():
        print(f"node key {key.name} was registered before", flush=True)
    else:
        return f"exit code {code}: {' '.join(output.split())[-300:]}"
    return None
