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
import threading
from dataclasses import dataclass
from pathlib import Path

from fedswarm.common.errors import FedswarmError
from fedswarm.common.options import add_arguments, option, required, root_cert_option
from fedswarm.common.options import flag as flag_option

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
    from fedswarm.client.trainer.node_key import make_node_key

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
    cmd = [flower_tool("flower-supernode"), "--superlink", args.coordinator]
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

    cmd = supernode_command(args, args.port or free_port())
    stop_on_sigterm()
    seen: list[str] = []
    with Supervisor() as procs:
        proc = procs.start("supernode", cmd, flower_env(), output=subprocess.PIPE)
        # a thread passes Flower's log through: the SuperNode's own children hold the pipe open after it exits
        echo = threading.Thread(target=_echo, args=(proc, seen), daemon=True)
        echo.start()
        code = proc.wait()
    echo.join(timeout=5)
    if any(REFUSED in line for line in seen):
        raise FedswarmError(
            f"the coordinator at {args.coordinator} refused this node (Flower exit code 305): "
            "is its public key registered there?"
        )
    if code:
        raise FedswarmError(f"flower-supernode exited with code {code}")
    return 0


def _echo(proc: subprocess.Popen, seen: list[str]) -> None:
    for line in proc.stdout or ():
        print(line, end="", flush=True)
        if REFUSED in line:
            seen.append(line)
