"""Bounds on inference sessions: KV-cache memory, their number, and idle time.

Every session reserves its whole cache before it starts (so the server's memory use has a
hard ceiling), and a reaper cancels sessions whose client went silent, freeing their cache.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("fedswarm.swarm.sessions")


class SessionLimitError(Exception):
    """A session cannot start: the cache budget is spent or it asks for too much."""


class SessionTable:
    """Reservations of cache bytes and the last activity of each live session."""

    def __init__(
        self, cache_budget_bytes: int, idle_timeout_s: float, clock: Any = time.monotonic, max_sessions: int = 64
    ) -> None:
        self.budget = cache_budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._used = 0
        self._sessions: dict[int, tuple[int, float, Any]] = {}  # id -> (bytes, last active, grpc context)
        self._next_id = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def count(self) -> int:
        """Open sessions."""
        with self._lock:
            return len(self._sessions)

    def open(self, nbytes: int, context: Any) -> int:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"{len(self._sessions)} sessions open, the most this server takes")
            if self._used + nbytes > self.budget:
                raise SessionLimitError(
                    f"KV cache of {nbytes / 2**20:.1f} MiB does not fit: {self._used / 2**20:.1f} of "
                    f"{self.budget / 2**20:.1f} MiB in use"
                )
            self._next_id += 1
            self._used += nbytes
            self._sessions[self._next_id] = (nbytes, self._clock(), context)
            return self._next_id

    def touch(self, session: int) -> None:
        with self._lock:
            nbytes, _, context = self._sessions[session]
            self._sessions[session] = (nbytes, self._clock(), context)

    def close(self, session: int) -> None:
        with self._lock:
            entry = self._sessions.pop(session, None)
            if entry is not None:
                self._used -= entry[0]

    def reap(self) -> int:
        """Cancel sessions idle for longer than the limit; returns how many were cancelled."""
        now = self._clock()
        with self._lock:
            stale = [(sid, ctx) for sid, (_, last, ctx) in self._sessions.items() if now - last > self.idle_timeout_s]
        for sid, context in stale:
            log.info("session %d idle for over %.0f s: closing it", sid, self.idle_timeout_s)
            if context is not None:
                context.cancel()
            self.close(sid)
        return len(stale)

    def start_reaper(self, stop: threading.Event, period_s: float = 1.0) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(period_s):
                self.reap()

        thread = threading.Thread(target=loop, name="session-reaper", daemon=True)
        thread.start()
        return thread
