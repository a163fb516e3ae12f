"""One supervisor for every process fedswarm starts, and for the tests that start fedswarm.

Each deployment command prints the exact Flower command line it runs (so users can run it
by hand), starts it in a session of its own and stops it with its whole process tree on exit,
Ctrl-C or error: SuperLink and SuperNode start SuperExec, ServerApp and ClientApp processes
of their own. A process is known by its pid and creation time, so a pid the system gave to
another process is never signalled nor reported.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import psutil

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


MARK = "FEDSWARM_SUPERVISED"  # in a started process's environment: the marks of the trees it belongs to


@dataclass(frozen=True)
class Tracked:
    """A process by identity: a pid names the same process only while its creation time is the same."""

    pid: int
    create_time: float
    cmdline: str = field(default="", compare=False)

    @classmethod
    def of(cls, proc: psutil.Process, cmdline: str | None = None) -> Tracked:
        return cls(proc.pid, proc.create_time(), _cmdline(proc) if cmdline is None else cmdline)

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.cmdline or '?'})"


@dataclass
class _Tree:
    name: str
    root: Tracked
    popen: subprocess.Popen | None
    mark: str  # "" for an adopted process: its tree is only what snapshots saw
    seen: dict[Tracked, None] = field(default_factory=dict)  # every descendant seen alive, in order


Handle = str | subprocess.Popen | Tracked  # a tree: its name (the latest started so), its Popen or its root


class Supervisor:
    """Starts processes, each in a session of its own, and stops each with its whole tree.

    ``with Supervisor() as sup:`` stops them all on the way out. A tree is the process started,
    every descendant seen while it ran (so orphans re-parented to init still count) and every
    process that inherited the tree's mark in its environment; ``leftovers()`` lists those
    still running, the check a test makes after stopping.
    """

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.trees: list[_Tree] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        output: IO[str] | int | None = None,
        quiet: bool = False,
    ) -> subprocess.Popen:
        """Start ``cmd`` in a session of its own, printed first unless ``quiet``; ``output`` takes stdout and stderr."""
        if not quiet:
            show(cmd)
        return self._popen(name, cmd, env, cwd, output, subprocess.STDOUT if output is not None else None)

    def run(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` to its end, its output captured; past ``timeout`` stop its tree and raise ``TimeoutExpired``."""
        proc = self._popen(name, cmd, env, None, subprocess.PIPE, subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=5.0)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            raise
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)

    def _popen(
        self,
        name: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str | Path | None,
        stdout: IO[str] | int | None,
        stderr: IO[str] | int | None,
    ) -> subprocess.Popen:
        mark = secrets.token_hex(8)
        env = dict(os.environ if env is None else env)
        env[MARK] = ",".join(m for m in (env.get(MARK, ""), mark) if m)  # nested supervisors: every mark stays
        proc = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group: Ctrl-C reaches it through us, once
            text=True,
            errors="replace",
        )
        self.trees.append(_Tree(name, Tracked.of(psutil.Process(proc.pid), shlex.join(cmd)), proc, mark))
        return proc

    def adopt(self, name: str, pid: int, create_time: float | None = None) -> Tracked:
        """Supervise a process started another way (multiprocessing); ``create_time`` pins which process ``pid`` was."""
        proc = psutil.Process(pid)
        root = Tracked.of(proc) if create_time is None else Tracked(pid, create_time, _cmdline(proc))
        self.trees.append(_Tree(name, root, None, ""))
        self._live(self.trees[-1:])  # its descendants so far
        return root

    def running(self, handle: Handle) -> bool:
        """Whether the process started (or adopted) under ``handle`` still runs, its tree aside."""
        tree = self._find(handle)
        if tree.popen is not None:
            return tree.popen.poll() is None
        return _process(tree.root) is not None

    def tree(self, handle: Handle) -> list[psutil.Process]:
        """The live processes of one tree, its root first if it runs."""
        return self._live([self._find(handle)])

    def snapshot(self) -> None:
        """Note the live descendants of every tree, to find them once their parents are gone."""
        self._live(self.trees)

    def stop(self, *handles: Handle, grace: float | None = None) -> None:
        """SIGTERM the roots, then the rest of their trees; SIGKILL what still runs after ``grace`` seconds."""
        self._stop([self._find(h) for h in handles], self.grace if grace is None else grace)

    def kill(self, *handles: Handle) -> None:
        """SIGKILL whole trees now (processes that start meanwhile too)."""
        self._kill([self._find(h) for h in handles])

    def stop_all(self, grace: float | None = None) -> None:
        """Stop every tree, together."""
        if self.trees:
            self._stop(self.trees, self.grace if grace is None else grace)
            log.debug("stopped %s", ", ".join(tree.name for tree in self.trees))

    def leftovers(self) -> list[Tracked]:
        """Every process of every tree that still runs, oldest first: ``[]`` once all are stopped."""
        return sorted((Tracked.of(proc) for proc in self._live(self.trees)), key=lambda t: t.create_time)

    def _find(self, handle: Handle) -> _Tree:
        for tree in reversed(self.trees):  # a name started twice: the latest
            if handle in (tree.name, tree.root) or (tree.popen is not None and tree.popen is handle):
                return tree
        raise KeyError(f"not started by this supervisor: {handle!r}")

    def _stop(self, trees: Sequence[_Tree], grace: float) -> None:
        deadline = time.monotonic() + grace
        self._live(trees)  # a snapshot while the roots still run: their orphans are nobody's children later
        roots = [proc for tree in trees if (proc := _process(tree.root)) is not None]
        _signal(roots, signal.SIGTERM)  # a fedswarm command stops its own processes on SIGTERM
        self._wait(trees, roots, deadline)
        rest = self._live(trees)
        _signal(rest, signal.SIGTERM)
        self._wait(trees, rest, max(deadline, time.monotonic() + min(grace, 1.0)))  # a moment at least
        self._kill(trees)

    def _kill(self, trees: Sequence[_Tree]) -> None:
        for _ in range(5):
            left = self._live(trees)
            if not left:
                break
            _signal(left, signal.SIGKILL)
            self._wait(trees, left, time.monotonic() + 5.0)
        for tree in trees:
            if tree.popen is not None and tree.popen.poll() is None:
                tree.popen.wait(timeout=5)

    def _live(self, trees: Sequence[_Tree]) -> list[psutil.Process]:
        """The running processes of ``trees``, noting each one seen: known ones, marked ones and their descendants."""
        everyone = {_key(p): p for p in psutil.process_iter(["ppid", "create_time"]) if p.info["create_time"]}
        children: dict[int, list[psutil.Process]] = {}
        for proc in everyone.values():
            children.setdefault(proc.info["ppid"], []).append(proc)
        marked = _marked(everyone.values(), {t.mark: t.root.create_time for t in trees if t.mark})
        found: dict[Tracked, psutil.Process] = {}
        for tree in trees:
            queue = [everyone[t] for t in (tree.root, *tree.seen) if t in everyone] + marked.get(tree.mark, [])
            visited: set[Tracked] = set()
            while queue:
                proc = queue.pop(0)
                key = _key(proc)
                if key in visited:
                    continue
                visited.add(key)
                found[key] = proc
                if key != tree.root:
                    tree.seen.setdefault(key)
                # a child is no older than its parent: an older one has a reused ppid
                queue += [c for c in children.get(proc.pid, []) if c.info["create_time"] >= key.create_time]
        return [proc for proc in found.values() if _running(proc)]

    def _wait(self, trees: Sequence[_Tree], procs: Sequence[psutil.Process], deadline: float) -> None:
        while True:
            for tree in trees:  # reap the roots we started: a zombie child counts as gone
                if tree.popen is not None:
                    tree.popen.poll()
            if not any(_running(p) for p in procs) or time.monotonic() >= deadline:
                return
            time.sleep(0.05)


Processes = Supervisor  # the name the deployment commands first used


def _key(proc: psutil.Process) -> Tracked:
    return Tracked(proc.pid, proc.info["create_time"])


def _marked(procs: Iterable[psutil.Process], marks: Mapping[str, float]) -> dict[str, list[psutil.Process]]:
    """The processes carrying each mark in their environment (created no earlier than its tree)."""
    found: dict[str, list[psutil.Process]] = {}
    if not marks:
        return found
    since = min(marks.values())
    for proc in procs:
        if proc.info["create_time"] < since:
            continue
        try:
            theirs = proc.environ().get(MARK, "")
        except psutil.Error:  # gone, a zombie, or another user's
            continue
        for mark in theirs.split(","):
            if mark in marks and proc.info["create_time"] >= marks[mark]:
                found.setdefault(mark, []).append(proc)
    return found


def _process(tracked: Tracked) -> psutil.Process | None:
    """The process ``tracked`` names, if it still runs: not once its pid went to another process."""
    try:
        proc = psutil.Process(tracked.pid)
    except psutil.Error:
        return None
    return proc if proc.create_time() == tracked.create_time and _running(proc) else None


def _running(proc: psutil.Process) -> bool:
    """Still running (psutil checks the pid was not reused); a zombie has exited."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil refuses a pid that went to another process
        except psutil.Error:
            pass


def _cmdline(proc: psutil.Process) -> str:
    try:
        return shlex.join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return ""


def stop_on_sigterm() -> None:
    """SIGTERM (kill, systemd, a test's finaliser) unwinds like Ctrl-C, so started processes get stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
