"""Starting Flower's own processes for the deployment commands, and always stopping them.

Each command prints the exact Flower command line it runs (so users can run it by hand),
starts it in a session of its own, and stops it with its whole process tree on exit,
Ctrl-C or error: SuperLink and SuperNode start SuperExec, ServerApp and ClientApp
processes of their own.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from fedswarm.common.errors import FedswarmError

log = logging.getLogger("fedswarm")

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else Flower `uv sync`s the app (and pulls CUDA torch)
    "FLWR_TELEMETRY_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def flower_env(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, plus Flower's switches, with this interpreter's scripts first on PATH.

    SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp``
    by name, so they must find the ones installed beside this fedswarm.
    """
    env = {**os.environ, **FLOWER_ENV, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


def flower_tool(name: str) -> str:
    """The path of a Flower console script installed beside this interpreter (else the bare name)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def show(cmd: Sequence[str], env_note: str = "") -> None:
    """Print the Flower command a fedswarm command runs, as the user would type it."""
    shown = [Path(cmd[0]).name, *cmd[1:]]
    print(f"$ {env_note}{shlex.join(shown)}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Block until ``host:port`` accepts connections; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedswarmError(f"{what} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise FedswarmError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


class Processes:
    """The processes a command started; ``with Processes() as procs:`` stops them all on the way out."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        env: Mapping[str, str],
        cwd: str | Path | None = None,
        output: IO[str] | None = None,
        quiet: bool = False,
    ) -> subprocess.Popen:
        if not quiet:
            show(cmd)
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,  # its own process group: Ctrl-C reaches it through us, once
            text=True,
        )
        self.started.append((name, proc))
        return proc

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every started process and its descendants; SIGKILL what is left after ``grace`` seconds."""
        for name, proc in reversed(self.started):
            stop_tree(proc, grace)
            log.debug("stopped %s (pid %d)", name, proc.pid)
        self.started.clear()


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc``, the processes it started (even those that left its group) and its group."""
    tree = _descendants(proc.pid) if proc.poll() is None else []
    for pid in [proc.pid, *tree]:
        _signal(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    for pid in tree:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for pid in [proc.pid, *tree]:
        _signal(pid, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its process group
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=5)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # already gone: its process group still gets the signals
        return []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_on_sigterm() -> None:
    """SIGTERM (kill, systemd, a test's finaliser) unwinds like Ctrl-C, so started processes get stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
