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
from pathlib import Path

from fedswarm.common.errors import FedswarmError

REFUSED = "Exit Code: 305"  # Flower: the SuperNode could not activate (e.g. its key is not registered)


def add_parser(sub: argparse._SubParsersAction) -> None:
    key = sub.add_parser(
        "node-key",
        help="make a node's authentication key pair",
        description="Writes NAME (private: stays on the node) and NAME.pub (give it to the coordinator).",
    )
    key.add_argument("--out", required=True, help="folder for the key files")
    key.add_argument("--name", default="node", help="file name of the key pair")
    key.set_defaults(handler=run_node_key)

    node = sub.add_parser(
        "node",
        help="join a coordinator as a client node (Flower SuperNode) training on a local data file",
        description="Starts flower-supernode; runs until Ctrl-C or until the coordinator refuses it.",
    )
    node.add_argument("--coordinator", required=True, help="HOST:PORT of `fedswarm coordinator`")
    node.add_argument("--data", required=True, help="this node's data: a .jsonl (evals chat format) or .csv file")
    node.add_argument("--root-cert", help="the coordinator's ca.crt (from `fedswarm certs`)")
    node.add_argument("--auth-key", help="this node's private key (from `fedswarm node-key`)")
    node.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on this node (svd aggregation; 0: the run's)")
    node.add_argument("--port", type=int, default=0, help="local port of the SuperNode's runtime API (0: a free one)")
    node.add_argument("--insecure", action="store_true", help="no TLS (only against an --insecure coordinator)")
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
    from fedswarm.common.processes import Processes, flower_env, free_port, stop_on_sigterm

    cmd = supernode_command(args, args.port or free_port())
    stop_on_sigterm()
    seen: list[str] = []
    with Processes() as procs:
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
