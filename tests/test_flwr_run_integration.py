"""The README's ``flwr run .`` line, run as a new user would: a fresh ``FLWR_HOME``, Flower's own local federation.

Flower 1.42's first ``flwr run`` creates a ``local`` connection whose simulation has 2
SuperNodes; the app's default config asks for 4 clients, so it trains on the 2 there are
and says so. The test gives the local SuperLink ports of its own
(``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``), so it never
submits to a SuperLink someone else left running on Flower's default ports, and stops the
SuperLink it started (``flwr run`` leaves it running) by its pid.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedswarm.common.processes import flower_env, free_port

REPO = Path(__file__).parents[1]
README_LINE = "flwr run . --run-config 'model=\"tiny\" num-server-rounds=2' --stream"
NOTE = re.compile(r"note: (\d+) nodes connected, training on \1 of the configured (\d+) clients")


def _readme_command() -> list[str]:
    lines = [line.strip() for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()]
    assert README_LINE in lines, "the README's flwr run line changed: update README_LINE with it"
    return shlex.split(README_LINE)


def _superlinks(home: Path) -> Iterator[int]:
    """Pids of the SuperLinks ``flwr run`` started for this FLWR_HOME (their log file is inside it)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(Path(part).name == "flower-superlink" for part in cmdline[:2]) and any(str(home) in p for p in cmdline):
            yield proc.info["pid"]


def _stop_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.integration
def test_readme_flwr_run_trains_on_the_local_federations_nodes(tmp_path):
    command = _readme_command()
    home = (tmp_path / "flwr-home").resolve()
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    env = flower_env(home, {**ports, "PYTHONUNBUFFERED": "1"})
    runs = REPO / "runs"
    had_runs = runs.exists()
    before = set(runs.iterdir()) if had_runs else set()
    output, ours = "", None
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        named = re.findall(r"fedswarm run folder: (\S+)", output)
        assert len(named) == 1, output[-3000:]
        ours = REPO / named[0]
        assert ours.parent == runs and ours not in before

        rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [row["round"] for row in rows] == [0, 1, 2]
        supernodes = int(re.search(r"\((\d+) simulated SuperNodes\)", output).group(1))
        trained = min(supernodes, 4)  # the app's default config: 4 clients
        assert [row["clients"] for row in rows[1:]] == [trained, trained]
        if supernodes < 4:
            assert NOTE.search(output).groups() == (str(supernodes), "4"), output[-3000:]
        assert (ours / "adapter" / "adapter_config.json").is_file()
        assert (ours / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((ours / "summary.json").read_text())["config"]["model"] == "tiny"
    finally:
        for pid in list(_superlinks(home)):
            _stop_tree(pid)
        # the run folder this test made: the one the run named, else those that appeared during it
        made = [ours] if ours is not None else sorted(set(runs.iterdir()) - before) if runs.exists() else []
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        if not had_runs and runs.exists() and not any(runs.iterdir()):
            runs.rmdir()
