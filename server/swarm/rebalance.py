"""``--blocks auto``: pick a span from the registries' announcements at start, and move when it pays.

The rules are in ``placement``; this module feeds them the swarm as the registries list it and
acts on their answer. A joining server waits (logging each retry) for a registry to answer,
up to ``START_WAIT_S``, since servers often start beside their registry; after that it fails in
one line. A running server checks every ``--rebalance-interval`` seconds and, when asked to
move, loads the new span beside the old one, swaps it in for new requests, re-announces, and
retires the old span in the background once its live sessions are done (see ``served``).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import FedswarmError
from fedswarm.common.registry_listing import list_registries
from fedswarm.common.security.transport import Security
from fedswarm.protos import swarm_pb2
from fedswarm.server.swarm.placement import Announced, Move, choose_span, should_move

if TYPE_CHECKING:
    from fedswarm.common.model import ModelSpec
    from fedswarm.server.swarm.handler import BlockServicer
    from fedswarm.server.swarm.options import ServeOptions
    from fedswarm.server.swarm.served import ServedSpan

log = logging.getLogger("fedswarm.swarm.rebalance")

START_WAIT_S = 60.0  # how long a joining server waits for some registry to answer
MAX_RETRY_S = 10.0


class RegistriesUnreachable(FedswarmError):
    """No registry answered."""


@dataclass(frozen=True)
class SwarmKey:
    """Which announcements are this server's swarm: same model, same merged adapter, same block count."""

    model_id: str
    adapter_id: str  # "" for the base model
    num_blocks: int

    def peers(self, servers: Sequence[swarm_pb2.ServerInfo]) -> list[Announced]:
        return [
            Announced(s.address, s.start, s.end, s.throughput)
            for s in servers
            if (s.model_id, s.adapter_id, s.num_blocks) == (self.model_id, self.adapter_id, self.num_blocks)
        ]


def list_swarm(registries: Sequence[str], security: Security, model_id: str) -> list[swarm_pb2.ServerInfo]:
    """The live servers of ``model_id`` any registry lists, one per address (the freshest entry wins)."""
    import grpc

    servers, failures = list_registries(registries, security, model_id)
    for registry, exc in failures:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise FedswarmError(f"registry {registry} refused this server ({exc.details()})") from None
    if failures and len(failures) == len(registries):
        unreachable = ", ".join(f"{registry} ({exc.code().name})" for registry, exc in failures)
        raise RegistriesUnreachable(f"registry unreachable: {unreachable}")
    return servers


def initial_span(
    lister: Callable[[], Sequence[swarm_pb2.ServerInfo]],
    key: SwarmKey,
    length: int,
    throughput: float = 0.0,
    wait_s: float | None = None,
) -> tuple[int, int]:
    """The span a joining server of ``length`` blocks takes; waits up to ``wait_s`` (default
    ``START_WAIT_S``) for a registry to answer.

    ``throughput`` 0 (not measured yet) counts as the median of the swarm's (1 if it is empty):
    it only weighs the choice, and a later rebalance check uses the measured figure.
    """
    wait_s = START_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            peers = key.peers(lister())
            break
        except RegistriesUnreachable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FedswarmError(
                    f"--blocks auto: no registry answered within {wait_s:g} s ({exc}); start one or fix --registry"
                ) from None
            log.warning("--blocks auto: %s; retrying in %.0f s", exc, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, MAX_RETRY_S)
    estimate = throughput or (statistics.median(p.throughput for p in peers) if peers else 1.0)
    start, end = choose_span(peers, key.num_blocks, length, estimate)
    log.info(
        "--blocks auto: taking blocks %d:%d of %d (%d servers of %s listed)",
        start, end, key.num_blocks, len(peers), key.model_id,
    )  # fmt: skip
    return start, end


def auto_span(
    spec: ModelSpec, merged: Path | None, registries: Sequence[str], security: Security, opts: ServeOptions
) -> tuple[int, int]:
    """``fedswarm swarm serve --blocks auto``: validate its options, then choose the span to load."""
    from fedswarm.common.adapter_digest import adapter_id
    from fedswarm.server.swarm.blocks import num_blocks

    if opts.num_blocks < 0:
        raise FedswarmError(f"--num-blocks {opts.num_blocks}: must be >= 0 (0: all of the model's blocks)")
    if opts.rebalance_interval < 0:
        raise FedswarmError(f"--rebalance-interval {opts.rebalance_interval}: must be >= 0 (0: never move)")
    if opts.rebalance_gain < 1:
        raise FedswarmError(f"--rebalance-gain {opts.rebalance_gain}: must be >= 1")
    key = SwarmKey(spec.model_id, adapter_id(merged) if merged is not None else "", num_blocks(spec))
    length = opts.num_blocks or key.num_blocks
    if length > key.num_blocks:
        log.warning("--num-blocks %d: the model has %d blocks; serving all of them", length, key.num_blocks)
    return initial_span(lambda: list_swarm(registries, security, key.model_id), key, length, opts.throughput)


class Rebalancer:
    """Checks, when asked, whether this server should move, and moves it (``check``; ``start`` loops it)."""

    def __init__(
        self,
        key: SwarmKey,
        lister: Callable[[], Sequence[swarm_pb2.ServerInfo]],
        current: Callable[[], swarm_pb2.ServerInfo],
        move: Callable[[int, int], None],
        min_gain: float,
    ) -> None:
        self.key = key
        self.lister = lister  # the swarm as the registries list it
        self.current = current  # this server's info (its span as served, not as listed)
        self.move = move  # loads and swaps in a new span
        self.min_gain = min_gain
        self._waited = 0  # consecutive checks that found a move for this server, but others ranked first

    def check(self) -> Move | None:
        """One check; returns the move made, if any."""
        info = self.current()
        me = Announced(info.address, info.start, info.end, info.throughput)
        try:
            peers = self.key.peers(self.lister())
        except FedswarmError as exc:
            log.warning("rebalance check skipped: %s", exc)
            return None
        move = should_move(peers, me, self.key.num_blocks, self.min_gain)
        if move is None:
            self._waited = 0
            return None
        if self._waited < move.rank:
            self._waited += 1
            log.info(
                "blocks %d:%d would strengthen the swarm; waiting for %d other servers to move first (check %d)",
                move.start, move.end, move.rank, self._waited,
            )  # fmt: skip
            return None
        self._waited = 0
        log.info("moving from blocks %d:%d to %d:%d to strengthen the swarm", me.start, me.end, move.start, move.end)
        self.move(move.start, move.end)
        return move

    def start(self, stop: threading.Event, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.check()
                except Exception:  # noqa: BLE001 (a failed move leaves the old span serving; try again later)
                    log.exception("rebalance check failed")

        thread = threading.Thread(target=loop, name="rebalance", daemon=True)
        thread.start()
        return thread


class SpanMover:
    """Moves a running server to new blocks: load, swap, re-announce, retire the old span when free."""

    def __init__(
        self,
        servicer: BlockServicer,
        build: Callable[[int, int], ServedSpan],
        publish: Callable[[Callable[[swarm_pb2.ServerInfo], None]], None],
        drain_s: float,
    ) -> None:
        self.servicer = servicer
        self.build = build  # loads blocks start:end, ready to serve
        self.publish = publish  # edits the server's info and re-announces it
        self.drain_s = drain_s  # longest wait for live sessions on the old span

    def __call__(self, start: int, end: int) -> None:
        served = self.build(start, end)
        old = self.servicer.swap(served)

        def moved(info: swarm_pb2.ServerInfo) -> None:
            info.start, info.end = start, end
            served.announce_adapters(info)

        self.publish(moved)
        threading.Thread(target=self._retire, args=(old,), name="retire-span", daemon=True).start()

    def _retire(self, old: ServedSpan) -> None:
        users = old.users
        if old.retire(self.drain_s):
            log.info("blocks %d:%d retired (%d requests finished on them first)", old.span.start, old.span.end, users)
        else:
            log.warning(
                "blocks %d:%d retired with %d requests still open after %.0f s; their clients fail over",
                old.span.start, old.span.end, old.users, self.drain_s,
            )  # fmt: skip
