"""Process memory figures for progress lines, per-round metrics and benchmarks."""

from __future__ import annotations

import ctypes
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


def _libc() -> ctypes.CDLL | None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``); False where there is none.

    A training step frees ~1 GB of activations; glibc keeps much of it in its arenas (above its
    dynamic mmap threshold, big blocks come from the heap), where later steps, other virtual
    clients' shards and Python objects fragment it, so a long-lived process's RSS creeps up
    round after round. Trimming between messages returns those pages; it takes milliseconds.
    """
    import gc

    gc.collect()  # cyclic garbage (messages, records, autograd leftovers) first, so its memory is free to trim
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


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
