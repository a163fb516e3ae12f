"""Ctrl-C during a simulation stops Ray and every process the simulation started."""

import signal
import subprocess
import sys
import time

import psutil
import pytest


@pytest.mark.integration
def test_ctrl_c_stops_every_process(labelled_file, tmp_path):
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--data", str(labelled_file),
        "--clients", "2", "--rounds", "50", "--local-steps", "2", "--batch-size", "4", "--eval-size", "12",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # wait until round 1 has started, noting every descendant
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
            if (tmp_path / "run" / "checkpoints" / "round-001").exists() and len(seen) > 3:
                break
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        else:
            pytest.fail("the simulation did not reach round 1 in time")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, proc.stderr.read()[-2000:]
    # Ray's workers exit once the driver has shut Ray down, each as soon as the machine schedules it: wait for them
    # (the 60 s only bounds a hang), then every process the simulation started must be gone
    _, alive = psutil.wait_procs([p for p in seen.values() if _alive(p)], timeout=60)
    assert not [p for p in alive if _alive(p)], f"still running: {[p.pid for p in alive]}"
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 2  # committed rounds survive


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
