"""The shipped Prometheus configuration: Prometheus' own promtool accepts it, and the alerts fire when they should."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: bash scripts/install_monitoring.sh")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROMTOOL), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


@pytest.mark.processes
def test_promtool_accepts_the_alerting_rules():
    proc = _promtool("check", "rules", "fedswarm-rules.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout


@pytest.mark.processes
def test_promtool_accepts_the_example_configuration():
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.processes
def test_alerts_fire_on_a_block_without_server_and_on_swarm_errors_only():
    proc = _promtool("test", "rules", "fedswarm-rules.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
