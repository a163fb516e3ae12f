"""Process memory figures for progress lines, per-round metrics and benchmarks."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak_rss` (else since it started), MiB."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Resident memory now, MiB (0 where /proc is missing)."""
    now = _status_kib("VmRSS")
    return now / 1024 if now is not None else 0.0


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: ``5`` to ``/proc/self/clear_refs`` resets VmHWM); False where that cannot be done."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
