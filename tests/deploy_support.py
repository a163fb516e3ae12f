"""What the deployment integration tests share: data records and a deployment driven by ``fedswarm`` commands.

A ``Deployment`` starts each command (coordinator, node, run) as a supervised process that logs
to ``ROOT/NAME.log``. By default every process runs here and dials 127.0.0.1; ``place`` puts a
process elsewhere (a command prefix such as ``ip netns exec NS``), ``address`` is where nodes and
``fedswarm run`` dial the coordinator and ``listen`` the interface it listens on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedswarm.common.processes import Supervisor

FEDSWARM = [sys.executable, "-m", "fedswarm.common.cli"]
NODES = 2  # not more: on a 2-core CI machine every extra node training in parallel slows each round


def records(start: int, count: int) -> list[dict]:
    """Evals-format records: is ``i`` odd?"""
    return [
        {
            "input": [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": f"Is {i} odd?"}],
            "ideal": "yes" if i % 2 else "no",
        }
        for i in range(start, start + count)
    ]


def here(name: str) -> list[str]:
    """Every process on this host, as it is: no command prefix."""
    return []


class Deployment:
    def __init__(
        self,
        root: Path,
        port: int,
        address: str = "127.0.0.1",
        listen: str = "127.0.0.1",
        place: Callable[[str], list[str]] = here,
    ) -> None:
        self.root, self.port, self.address, self.listen, self.place = root, port, address, listen, place
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-unused"), "PYTHONUNBUFFERED": "1"}
        # SIGTERM a fedswarm command (it stops the Flower processes it started); SIGKILL whatever is left after 20 s
        self.sup = Supervisor(grace=20.0)
        self.coordinator: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.runs = root / "runs"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with (self.root / f"{name}.log").open("a") as log:
            return self.sup.start(name, [*self.place(name), *FEDSWARM, *args], self.env, output=log, quiet=True)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_coordinator(self) -> None:
        self.coordinator = self.start(
            "coordinator", "coordinator", "--host", self.listen, "--port", str(self.port),
            "--certs", str(self.root / "certs"), "--auth-keys", str(self.root / "auth"), "--run-dir", str(self.runs),
        )  # fmt: skip

    def wait_for_log(self, name: str, text: str, count: int = 1, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log(name).count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {count} x {text!r} within {timeout} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def node_args(self, key: str, data: Path, address: str | None = None) -> list[str]:
        return [
            "node", "--coordinator", f"{address or self.address}:{self.port}", "--data", str(data),
            "--root-cert", str(self.root / "certs" / "ca.crt"), "--auth-key", str(self.root / "keys" / key),
        ]  # fmt: skip

    def start_node(self, i: int, *extra: str) -> None:
        self.nodes[i] = self.start(f"node{i}", *self.node_args(f"n{i}", self.root / f"node{i}.jsonl"), *extra)

    def run_args(self, out: str, *extra: str) -> list[str]:
        return [
            "run", "--federation", "local", "--coordinator", f"{self.address}:{self.port}",
            "--root-cert", str(self.root / "certs" / "ca.crt"), "--flwr-home", str(self.root / "flwr"),
            "--model", "tiny", "--data", str(self.root / "held.jsonl"), "--clients", str(NODES), "--rounds", "2",
            "--local-steps", "2", "--batch-size", "4", "--eval-size", "12", "--round-timeout", "240",
            "--out", out, *extra,
        ]  # fmt: skip

    def run(self, *args: str, timeout: float = 400.0) -> subprocess.CompletedProcess:
        return self.sup.run(args[0], [*self.place(args[0]), *FEDSWARM, *args], self.env, timeout=timeout)

    def metrics(self, out: str) -> list[dict]:
        path = self.runs / out / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
