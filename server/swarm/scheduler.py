"""Continuous batching: one compute thread runs every session's steps, decode steps together.

Handlers submit work and wait. The scheduler takes the oldest job; if it is a decode step
(one new token), it waits a short window (or until every open session has a step pending, or
the batch is full) for other sessions' decode steps over the same blocks, runs them as one
forward pass, and hands each session its rows. Sessions join and leave between steps. Prefill,
replays and stateless ``Forward`` calls run alone, in arrival order. One thread also keeps a
CPU server's cores from being fought over by concurrent requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

    from fedswarm.server.swarm.blocks import SpanCache, SpanModel
    from fedswarm.server.swarm.unmerged_lora import SpanAdapter

log = logging.getLogger("fedswarm.swarm.scheduler")

T = TypeVar("T")


@dataclass
class SessionState:
    """What a block server keeps for one inference session: its blocks, cache and adapter version."""

    start: int
    end: int
    cache: SpanCache
    adapter: SpanAdapter | None  # pinned at open: a newer version of the adapter does not affect it
    batch_size: int = 0  # rows computed together in the session's last step


@dataclass
class _Job:
    session: SessionState | None  # a decode step of this session, or None for a solo job
    hidden: Any = None
    solo: Callable[[], Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0]) if self.hidden is not None else 0

    def batches_with(self, other: _Job) -> bool:
        a, b = self.session, other.session
        return a is not None and b is not None and (a.start, a.end) == (b.start, b.end)


class BatchScheduler:
    """The span's single compute thread (see the module docstring)."""

    def __init__(
        self,
        span: SpanModel,
        max_batch: int = 8,
        window_s: float = 0.002,
        active_sessions: Callable[[], int] = lambda: 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.span = span
        self.max_batch = max_batch  # rows of one batched decode step
        self.window_s = window_s  # longest wait for other sessions' steps, seconds
        self._active = active_sessions
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._stopped = False
        self.last_batch = 0  # rows of the last decode batch (for metrics and tests)
        self.on_batch: Callable[[int], None] = lambda rows: None  # told each decode batch's rows (metrics)
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)

    def start(self) -> BatchScheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the compute thread, alone; returns its result or raises its error."""
        return self._submit(_Job(session=None, solo=fn))

    def step(self, session: SessionState, hidden: torch.Tensor) -> torch.Tensor:
        """Run new tokens of ``session`` through its blocks; one-token steps batch with other sessions'."""
        if hidden.shape[1] != 1:
            span = self.span
            session.batch_size = hidden.shape[0]
            return self.run(lambda: span.forward(hidden, session.start, session.end, session.cache, session.adapter))
        return self._submit(_Job(session=session, hidden=hidden))

    def _submit(self, job: _Job) -> Any:
        with self._cond:
            if self._stopped:
                raise RuntimeError("the block server is stopping")
            self._queue.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._compute(jobs)
            except BaseException as exc:  # noqa: BLE001 (handed to every waiting handler)
                for job in jobs:
                    job.error = exc
            for job in jobs:
                job.done.set()

    def _take(self) -> list[_Job] | None:
        """The next jobs to compute together: a solo job, or decode steps over the same blocks."""
        with self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait()
            first = self._queue[0]
            if first.session is None:
                return [self._queue.pop(0)]
            deadline = time.monotonic() + self.window_s
            while True:
                batch = self._compatible(first)
                rows = sum(job.rows for job in batch)
                left = deadline - time.monotonic()
                if rows >= self.max_batch or len(batch) >= self._active() or left <= 0 or self._stopped:
                    break
                self._cond.wait(left)
            for job in batch:
                self._queue.remove(job)
            return batch

    def _compatible(self, first: _Job) -> list[_Job]:
        batch, rows = [first], first.rows
        for job in self._queue[1:]:
            if job.batches_with(first) and rows + job.rows <= self.max_batch:
                batch.append(job)
                rows += job.rows
        return batch

    def _compute(self, jobs: list[_Job]) -> None:
        if jobs[0].solo is not None:
            jobs[0].result = jobs[0].solo()
            return
        jobs.sort(key=lambda job: _adapter_key(job.session))  # each adapter's rows contiguous
        sessions = [job.session for job in jobs if job.session is not None]
        outputs = self.span.forward_batch(
            [job.hidden for job in jobs],
            [s.cache for s in sessions],
            sessions[0].start,
            sessions[0].end,
            [s.adapter for s in sessions],
        )
        self.last_batch = sum(job.rows for job in jobs)
        self.on_batch(self.last_batch)
        for job, session, out in zip(jobs, sessions, outputs, strict=True):
            job.result = out
            session.batch_size = self.last_batch


def _adapter_key(session: SessionState | None) -> tuple[str, str, int]:
    adapter = session.adapter if session is not None else None
    return ("", "", 0) if adapter is None else (adapter.name, adapter.digest, id(adapter))
