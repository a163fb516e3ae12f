"""The span a block server serves, as one swappable unit: its blocks, compute thread and adapters.

A server that moves (``--blocks auto``) loads its new span beside the old one and swaps it in;
requests that started on the old span keep it to their end (each holds its ``ServedSpan``),
new ones get the new span, and the old one is closed once its last request is done (or after
a bounded wait: a session still open then fails over to another server, which replays it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedswarm.protos import swarm_pb2
    from fedswarm.server.swarm.adapter_store import AdapterStore
    from fedswarm.server.swarm.blocks import SpanModel
    from fedswarm.server.swarm.scheduler import BatchScheduler


@dataclass(eq=False)
class ServedSpan:
    """One span and what runs it; counts the requests using it so a retired span knows when it is free."""

    span: SpanModel
    scheduler: BatchScheduler
    adapters: AdapterStore | None = None
    stopped: threading.Event = field(default_factory=threading.Event)  # set when closed: ends its adapter watcher
    _users: int = 0
    _retired: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def acquire(self) -> bool:
        """Count one more request on this span; False once it is retired (take the server's current span)."""
        with self._cond:
            if self._retired:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()

    @property
    def users(self) -> int:
        with self._cond:
            return self._users

    def retire(self, wait_s: float) -> bool:
        """Take no new requests, wait up to ``wait_s`` for the running ones, then stop computing.

        Returns whether every request finished in time; the others' next steps fail (their
        clients re-route and replay), and the span's memory goes with its last reference.
        """
        with self._cond:
            self._retired = True
            finished = self._cond.wait_for(lambda: self._users == 0, wait_s)
        self.close()
        return finished

    def announce_adapters(self, info: swarm_pb2.ServerInfo) -> None:
        """Set ``info``'s unmerged adapters to the versions this span serves now."""
        del info.adapters[:]
        if self.adapters is not None:
            info.adapters.extend(self.adapters.announced())

    def close(self) -> None:
        self.stopped.set()
        self.scheduler.stop()
