"""``fedswarm node-key`` and ``fedswarm node``: a client machine joins a coordinator.

``fedswarm node`` runs Flower's ``flower-supernode`` against the coordinator over TLS,
signing in with the node's private key; its ClientApp trains on this machine's own data
file, whose path travels only in the node's local config (``data-path``), never to the
coordinator.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import FedswarmError
from fedswarm.common.options import add_arguments, option, required, root_cert_option
from fedswarm.common.options import flag as flag_option

if TYPE_CHECKING:
    from fedswarm.common.processes import Supervisor

LOOPBACK = "127.0.0.1"  # the SuperNode's runtime API is unauthenticated: it never leaves this machine
WORKER_START_TIMEOUT = 60.0  # seconds for the SuperNode to open its runtime API
TLS_FAILED = "certificate verify failed"  # the coordinator's certificate does not cover the address dialled
REFUSED = "Exit Code: 305"  # Flower: the SuperNode could not activate (e.g. its key is not registered)


@dataclass(frozen=True, kw_only=True)
class NodeKeyCommand:
    """``fedswarm node-key``."""

    out: str = required("folder for the key files")
    name: str = option("node", "file name of the key pair")


@dataclass(frozen=True, kw_only=True)
class NodeCommand:
    """``fedswarm node``."""

    coordinator: str = required("HOST:PORT of `fedswarm coordinator`")
    data: str = required("this node's data: a .jsonl (evals chat format) or .csv file")
    root_cert: str | None = root_cert_option()
    auth_key: str | None = option(None, "this node's private key (from `fedswarm node-key`)")
    lora_rank: int = option(0, "LoRA rank on this node (svd aggregation; 0: the run's)")
    port: int = option(0, "local port of the SuperNode's runtime API (0: a free one)")
    insecure: bool = flag_option("no TLS (only against an --insecure coordinator)")
    poll_interval: float = option(
        0.5, "warm nodes: longest idle wait before asking the coordinator again, seconds (Flower's own: 3)"
    )
    cold: bool = flag_option(
        "Flower's own executor: a fresh flwr-clientapp process per message, which re-imports torch and reloads "
        "the model every round (default: a warm worker beside the SuperNode runs every message in one process "
        "that keeps them loaded)"
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    key = sub.add_parser(
        "node-key",
        help="make a node's authentication key pair",
        description="Writes NAME (private: stays on the node) and NAME.pub (give it to the coordinator).",
    )
    add_arguments(key, NodeKeyCommand)
    key.set_defaults(handler=run_node_key)

    node = sub.add_parser(
        "node",
        help="join a coordinator as a client node (Flower SuperNode) training on a local data file",
        description="Starts flower-supernode; runs until Ctrl-C or until the coordinator refuses it.",
    )
    add_arguments(node, NodeCommand)
    node.set_defaults(handler=run_node)


def run_node_key(args: argparse.Namespace) -> int:
    from fedswarm.common.security.node_key import make_node_key

    keys = make_node_key(args.out, args.name)
    print(f"private key (keep on this node): {keys.private}")
    print(f"public key (give to the coordinator's --auth-keys folder): {keys.public}")
    return 0


def node_config(data: str, lora_rank: int) -> str:
    """Flower's ``--node-config`` value: TOML ``key=value`` pairs separated by spaces."""
    path = Path(data)
    if not path.is_file():
        raise FedswarmError(f"--data {data}: no such file (a node trains on its own .jsonl or .csv file)")
    if path.suffix not in (".jsonl", ".csv"):
        raise FedswarmError(f"--data {data}: expected a .jsonl or .csv file")
    if lora_rank < 0:
        raise FedswarmError(f"--lora-rank must be >= 0, got {lora_rank}")
    pairs = [f"data-path={json.dumps(str(path.resolve()))}"]
    return " ".join(pairs + ([f"lora-rank={lora_rank}"] if lora_rank else []))


def supernode_command(args: argparse.Namespace, port: int) -> list[str]:
    from fedswarm.common.processes import flower_tool

    if ":" not in args.coordinator:
        raise FedswarmError(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
    if args.cold:  # Flower's SuperNode as it is
        cmd = [flower_tool("flower-supernode"), "--superlink", args.coordinator]
    else:  # the same, with its idle sleeps capped (supernode.py)
        if not args.poll_interval > 0:
            raise FedswarmError(f"--poll-interval must be > 0 seconds, got {args.poll_interval}")
        cmd = [sys.executable, "-m", "fedswarm.client.trainer.supernode", "--poll-interval", str(args.poll_interval)]
        cmd += ["--superlink", args.coordinator]
    cmd += ["--node-config", node_config(args.data, args.lora_rank), "--port", str(port)]
    if args.insecure:
        return [*cmd, "--insecure"]
    for flag, value in (("--root-cert", args.root_cert), ("--auth-key", args.auth_key)):
        if not value or not Path(value).is_file():
            raise FedswarmError(f"{flag} FILE is needed (no such file: {value!r}), or --insecure")
    cmd += ["--root-certificates", str(Path(args.root_cert).resolve())]
    return [*cmd, "--auth-supernode-private-key", str(Path(args.auth_key).resolve())]


def run_node(args: argparse.Namespace) -> int:
    from fedswarm.common.processes import Supervisor, flower_env, free_port, stop_on_sigterm

    port = args.port or free_port()
    cmd = supernode_command(args, port)
    if not args.cold:  # the SuperNode runs no executor; the warm worker takes its tasks on loopback
        cmd += ["--isolation", "process", "--host", LOOPBACK]
    stop_on_sigterm()
    seen: list[str] = []
    # private to this node (0700): the warm worker's journal holds its running task's token
    with tempfile.TemporaryDirectory(prefix="fedswarm-node-") as private, Supervisor() as procs:
        proc = procs.start("supernode", cmd, flower_env(), output=subprocess.PIPE)
        # a thread passes Flower's log through: the SuperNode's own children hold the pipe open after it exits
        echo = threading.Thread(target=_echo, args=(proc, seen), daemon=True)
        echo.start()
        if not args.cold:
            threading.Thread(
                target=keep_worker, args=(procs, proc, port, Path(private) / "task.json"), daemon=True
            ).start()
        code = proc.wait()
    echo.join(timeout=5)
    tls = [line.strip() for line in seen if TLS_FAILED in line.lower()]
    if tls:  # checked first: Flower then also reports its exit code 305
        raise FedswarmError(
            f"this node does not trust the coordinator at {args.coordinator} ({tls[0][-160:]}): dial the name or "
            "address its certificate was made for (`fedswarm certs --host`), with that CA's ca.crt as --root-cert"
        )
    if any(REFUSED in line for line in seen):
        raise FedswarmError(
            f"the coordinator at {args.coordinator} refused this node (Flower exit code 305): "
            "is its public key registered there?"
        )
    if code:
        raise FedswarmError(f"flower-supernode exited with code {code}")
    return 0


def worker_command(port: int, journal: Path) -> list[str]:
    return [
        sys.executable, "-m", "fedswarm.client.trainer.warm", "--runtime-api", f"{LOOPBACK}:{port}",
        "--journal", str(journal),
    ]  # fmt: skip


def keep_worker(procs: Supervisor, supernode: subprocess.Popen, port: int, journal: Path) -> None:
    """Run the warm worker beside ``supernode`` for as long as it runs; restart it when it dies.

    A worker that dies mid-task leaves that task in ``journal``; the restarted worker answers it
    with an error reply (the round counts the node as failed) before it takes the next one.
    Restarts back off up to 30 s.
    """
    from fedswarm.common.processes import flower_env, wait_for_port

    try:
        wait_for_port(LOOPBACK, port, supernode, WORKER_START_TIMEOUT, "the SuperNode's runtime API")
    except FedswarmError:
        return  # the SuperNode did not come up; run_node reports why
    backoff, restarts = 0.5, 0
    while supernode.poll() is None:
        started = time.monotonic()
        worker = procs.start(f"worker-{restarts}", worker_command(port, journal), flower_env(), quiet=restarts > 0)
        code = worker.wait()
        if supernode.poll() is not None:
            return
        restarts += 1
        backoff = 0.5 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
        print(f"fedswarm: the warm worker exited with code {code}; restarting it in {backoff:.1f} s", flush=True)
        time.sleep(backoff)


def _echo(proc: subprocess.Popen, seen: list[str]) -> None:
    for line in proc.stdout or ():
        print(line, end="", flush=True)
        if REFUSED in line or TLS_FAILED in line.lower():
            seen.append(line)
