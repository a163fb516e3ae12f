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
from pathlib import Path

from fedswarm.common.errors import FedswarmError

log = logging.getLogger("fedswarm")

CONNECTION = "fedswarm"  # the coordinator's own SuperLink connection, in RUN_DIR/.flwr
KEY_POLL_SECONDS = 2.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser(
        "certs",
        help="make a CA and a TLS certificate for the coordinator",
        description="Writes ca.crt (give it to nodes), ca.key, server.pem and server.key (keep them).",
    )
    certs.add_argument("--out", required=True, help="folder for the certificate files")
    certs.add_argument(
        "--host", nargs="+", required=True, help="names or IPs nodes dial (127.0.0.1 and localhost are always added)"
    )
    certs.add_argument("--days", type=int, default=365, help="validity, days")
    certs.set_defaults(handler=run_certs)

    coord = sub.add_parser(
        "coordinator",
        help="run the coordinator (Flower SuperLink with TLS and node authentication)",
        description="Starts flower-superlink, registers node keys, and serves until Ctrl-C.",
    )
    coord.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    coord.add_argument("--port", type=int, default=9092, help="port of the SuperLink's HTTPS APIs (Fleet, Control)")
    coord.add_argument("--certs", help="folder from `fedswarm certs` (ca.crt, server.pem, server.key)")
    coord.add_argument("--auth-keys", help="folder of node public keys (*.pub) to register; watched while running")
    coord.add_argument("--run-dir", default="runs", help="working folder: run folders, SuperLink state and log")
    coord.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (trusted LAN only)")
    coord.set_defaults(handler=run_coordinator)


def run_certs(args: argparse.Namespace) -> int:
    from fedswarm.server.coordinator.tls import make_certificates

    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    paths = make_certificates(args.out, hosts, args.days)
    print(f"CA certificate (copy to every node and to where you run `fedswarm run`): {paths.ca_cert}")
    print(f"server certificate for {', '.join(hosts)}: {paths.server_cert} (+ {paths.server_key.name}, keep private)")
    return 0


def superlink_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``flower-superlink`` command line for these options."""
    from fedswarm.common.processes import flower_tool
    from fedswarm.server.coordinator.tls import CertPaths

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
    from fedswarm.common.processes import Processes, flower_env, stop_on_sigterm, wait_for_port

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
    with Processes() as procs:
        link = procs.start("superlink", cmd, flower_env(), cwd=run_dir)
        wait_for_port(local, args.port, link, 60.0, "flower-superlink")
        print(f"coordinator listening on {args.host}:{args.port}; runs in {run_dir}", flush=True)
        print(f"SuperLink connection '{CONNECTION}' for flwr: {config} (FLWR_HOME={home})", flush=True)
        keys = KeyRegistrar(Path(args.auth_keys), home) if args.auth_keys else None
        while link.poll() is None:
            if keys is not None:
                keys.register_new()
            time.sleep(KEY_POLL_SECONDS)
        raise FedswarmError(f"flower-superlink exited with code {link.returncode}")


class KeyRegistrar:
    """Registers each ``*.pub`` in a folder once, with ``flwr supernode register``."""

    def __init__(self, folder: Path, home: Path) -> None:
        self.folder = folder
        self.home = home
        self.done: set[str] = set()

    def register_new(self) -> None:
        from fedswarm.common.processes import flower_env, flower_tool, show

        new = [p for p in sorted(self.folder.glob("*.pub")) if p.name not in self.done]
        started = []
        for key in new:  # in parallel: each `flwr` call spends seconds importing
            cmd = [flower_tool("flwr"), "supernode", "register", str(key.resolve()), CONNECTION, "--format", "json"]
            show(cmd, f"FLWR_HOME={self.home} ")
            env = flower_env(self.home)
            started.append((key, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for key, proc in started:
            out, _ = proc.communicate(timeout=120)
            self.done.add(key.name)
            _report(key, proc.returncode, out.decode(errors="replace"))


def _report(key: Path, code: int, output: str) -> None:
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
        log.warning("could not register node key %s: %s", key.name, " ".join(output.split())[-300:])
