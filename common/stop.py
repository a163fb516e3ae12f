"""A process-wide stop request (Ctrl-C), checked by long loops running in other threads.

Flower's simulation runs the ServerApp in a worker thread; Python delivers Ctrl-C only to
the main thread, so the round loop polls this event and stops at the next check.
"""

from __future__ import annotations

import threading

_REQUESTED = threading.Event()


def request_stop() -> None:
    _REQUESTED.set()


def clear_stop() -> None:
    _REQUESTED.clear()


def stop_requested() -> bool:
    return _REQUESTED.is_set()


def check_stop() -> None:
    """Raise KeyboardInterrupt in the calling thread once a stop was requested."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt("stopped by the user")
