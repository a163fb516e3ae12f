"""The process supervisor every fedswarm command and integration fixture uses: real process trees, no mocks.

The tree these tests start: ROOT (supervised) starts CHILD, which starts two grandchildren in
sessions of their own and exits, so that both are orphans re-parented to init (or a subreaper):
ORPHAN-A ignores SIGTERM and inherits the supervisor's mark in its environment; ORPHAN-B has an
empty environment, so only a snapshot taken while CHILD lived ties it to the tree.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedswarm.common.processes import MARK, Supervisor, Tracked
from tests.conftest import assert_no_leftovers

SLEEP = "import time; time.sleep(60)"
IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
ORPHAN_A = f"{IGNORE_SIGTERM}; import pathlib, sys; pathlib.Path(sys.argv[1]).touch(); {SLEEP}"
SPAWNER = f"import subprocess as s, sys; s.Popen([sys.executable, '-c', {SLEEP!r}], start_new_session=True); {SLEEP}"
CHILD = """
import pathlib, subprocess, sys, time
folder = pathlib.Path(sys.argv[1])
a = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(folder / "a-ready"), "orphan-a"], start_new_session=True)
b = subprocess.Popen([sys.executable, "-c", sys.argv[3], "orphan-b"], start_new_session=True, env={})
print(a.pid, b.pid, flush=True)
while not (folder / "go").exists():
    time.sleep(0.05)
"""
ROOT = "import subprocess, sys, time; subprocess.run([sys.executable, '-c', *sys.argv[1:]]); time.sleep(60)"


def _running(pid: int, create_time: float) -> bool:
    """Whether the process ``pid`` that was created at ``create_time`` still runs (not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(check, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)


def _orphaned_tree(sup: Supervisor, folder: Path) -> tuple[subprocess.Popen, list[Tracked]]:
    """Start ROOT; return it and the two orphans once CHILD has exited (each orphan by pid and creation time)."""
    cmd = [sys.executable, "-c", ROOT, CHILD, str(folder), ORPHAN_A, SLEEP]
    root = sup.start("tree", cmd, output=subprocess.PIPE, quiet=True)
    assert root.stdout is not None
    pids = [int(pid) for pid in root.stdout.readline().split()]
    orphans = [Tracked.of(psutil.Process(pid)) for pid in pids]
    _wait(lambda: (folder / "a-ready").exists(), "SIGTERM handler in ORPHAN-A")
    child = psutil.Process(orphans[0].pid).parent()
    assert child is not None and child.ppid() == root.pid
    sup.snapshot()  # while CHILD lives: the only way to ORPHAN-B, which carries no mark
    (folder / "go").touch()
    _wait(lambda: not _running(child.pid, child.create_time()), "exit of CHILD")
    for orphan in orphans:  # re-parented: no longer anyone's descendant in the tree
        assert psutil.Process(orphan.pid).ppid() not in (root.pid, child.pid)
    assert MARK in psutil.Process(orphans[0].pid).environ()
    assert MARK not in psutil.Process(orphans[1].pid).environ()
    return root, orphans


def _kill(tracked: list[Tracked]) -> None:
    for t in tracked:
        if _running(t.pid, t.create_time):
            psutil.Process(t.pid).kill()


@pytest.mark.processes
def test_stopping_a_tree_stops_its_orphans_too(supervisor, tmp_path):
    root, orphans = _orphaned_tree(supervisor, tmp_path)
    try:
        assert {t.pid for t in supervisor.leftovers()} >= {root.pid, *(t.pid for t in orphans)}
        supervisor.stop_all(grace=1.0)  # ORPHAN-A ignores SIGTERM: it takes SIGKILL after the grace
        assert root.returncode == -signal.SIGTERM
        assert not any(_running(t.pid, t.create_time) for t in orphans)
        assert supervisor.leftovers() == []
    finally:
        _kill(orphans)


@pytest.mark.processes
def test_leftover_check_fails_on_an_orphan_that_escaped_stopping(supervisor, tmp_path):
    root, orphans = _orphaned_tree(supervisor, tmp_path)
    try:
        os.kill(root.pid, signal.SIGKILL)  # stopped the way the old fixtures did: one pid, not its tree
        root.wait(timeout=10)
        with pytest.raises(psutil.NoSuchProcess):  # the old check: children of a reaped parent are nobody's
            psutil.Process(root.pid).children(recursive=True)
        assert set(supervisor.leftovers()) == set(orphans)  # by pid and creation time
        with pytest.raises(AssertionError, match="processes left running after stopping") as failed:
            assert_no_leftovers(supervisor)
        assert "orphan-a" in str(failed.value) and "orphan-b" in str(failed.value)
        assert all(_running(t.pid, t.create_time) for t in orphans)
    finally:
        supervisor.stop_all(grace=1.0)  # the supervisor still knows them, and stops them
        _kill(orphans)
    assert supervisor.leftovers() == []


@pytest.mark.processes
def test_a_reused_pid_is_neither_reported_nor_killed(supervisor):
    stranger = subprocess.Popen([sys.executable, "-c", SLEEP])  # not supervised
    try:
        created = psutil.Process(stranger.pid).create_time()
        # a record of an earlier process that had this pid, which the system has given to `stranger` since
        ghost = supervisor.adopt("ghost", stranger.pid, create_time=created - 100.0)
        assert ghost.pid == stranger.pid and not supervisor.running("ghost")
        assert supervisor.leftovers() == []
        supervisor.kill("ghost")
        supervisor.stop_all(grace=1.0)
        assert stranger.poll() is None, "the supervisor killed a process it never started"
        # the same pid with its own creation time is that process: reported, then stopped
        supervisor.adopt("stranger", stranger.pid)
        assert supervisor.leftovers() == [Tracked(stranger.pid, created)]
        supervisor.stop("stranger", grace=5.0)
        assert stranger.wait(timeout=10) == -signal.SIGTERM
    finally:
        if stranger.poll() is None:
            stranger.kill()
            stranger.wait()


@pytest.mark.processes
def test_run_stops_the_whole_tree_on_timeout(supervisor):
    done = supervisor.run("echo", [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    with pytest.raises(subprocess.TimeoutExpired):
        supervisor.run("slow", [sys.executable, "-c", SPAWNER], timeout=3.0)
    assert len(supervisor.trees[-1].seen) == 1  # its child, in a session of its own, was stopped with it
    assert supervisor.leftovers() == []


@pytest.mark.processes
def test_key_registration_that_times_out_is_retried_then_given_up_without_stopping_the_coordinator(
    supervisor, tmp_path, caplog
):
    from fedswarm.server.coordinator.launch import KeyRegistrar

    keys = tmp_path / "auth"
    keys.mkdir()
    (keys / "n0.pub").write_text("not a real key\n")
    registrar = KeyRegistrar(keys, tmp_path / ".flwr", supervisor, timeout=0.2, attempts=2)
    caplog.set_level(logging.WARNING, logger="fedswarm")
    for attempt in (1, 2):  # each `flwr supernode register` outlives 0.2 s (importing flwr alone takes longer)
        registrar.register_new()
        assert len(supervisor.trees) == attempt and not supervisor.running(supervisor.trees[-1].root)
        assert supervisor.leftovers() == []
    messages = [r.getMessage() for r in caplog.records]
    assert "node key n0.pub not registered (attempt 1 of 2): `flwr supernode register` did not finish" in messages[0]
    assert messages[1].startswith("gave up on node key n0.pub after 2 attempts") and len(messages) == 2
    registrar.register_new()  # given up: nothing more is started until the key file is written again
    assert len(supervisor.trees) == 2
