"""Route planning: which servers run which blocks, for the least estimated latency.

Pure and deterministic (the same servers give the same route), so it is unit-tested alone.
A hop may use part of a server's span, which lets a route switch to a faster server mid-span
and lets a replacement cover exactly the blocks a failed server was running.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedswarm.common.errors import FedswarmError

DEFAULT_HOP_OVERHEAD_S = 0.002  # network + serialisation per hop on a LAN; dominates tiny spans


@dataclass(frozen=True)
class Peer:
    """A live server as the planner sees it."""

    address: str
    start: int  # first block held (inclusive)
    end: int  # last block held (exclusive)
    throughput: float  # block-tokens per second


@dataclass(frozen=True)
class Hop:
    """Blocks ``start..end-1`` run on the server at ``address``."""

    address: str
    start: int
    end: int


class NoRouteError(FedswarmError):
    """No chain of live servers covers the blocks; ``missing`` lists the uncovered ranges."""

    def __init__(self, missing: Sequence[tuple[int, int]], banned: Iterable[str] = (), what: str = "") -> None:
        self.missing = list(missing)
        ranges = ", ".join(format_blocks(a, b) for a, b in self.missing)
        banned = sorted(banned)
        note = f" (excluding {len(banned)} failed server(s): {', '.join(banned)})" if banned else ""
        of = f" with {what}" if what else ""
        super().__init__(f"no route covers all blocks: no live server{of} holds {ranges}{note}")


def format_blocks(start: int, end: int) -> str:
    """Blocks ``start..end-1`` in words: "block 3" or "blocks 2-3"."""
    return f"block {start}" if end - start == 1 else f"blocks {start}-{end - 1}"


def missing_blocks(peers: Iterable[Peer], start: int, end: int) -> list[tuple[int, int]]:
    """Ranges of ``start..end-1`` held by no peer, as ``(first, last + 1)`` pairs."""
    covered = [False] * (end - start)
    for peer in peers:
        for block in range(max(peer.start, start), min(peer.end, end)):
            covered[block - start] = True
    gaps: list[tuple[int, int]] = []
    for offset, ok in enumerate(covered):
        block = start + offset
        if ok:
            continue
        if gaps and gaps[-1][1] == block:
            gaps[-1] = (gaps[-1][0], block + 1)
        else:
            gaps.append((block, block + 1))
    return gaps


def plan_route(
    peers: Sequence[Peer],
    start: int,
    end: int,
    banned: Iterable[str] = (),
    hop_overhead_s: float = DEFAULT_HOP_OVERHEAD_S,
) -> list[Hop]:
    """The hops covering blocks ``start..end-1`` with the least estimated time per token.

    A hop costs ``hop_overhead_s + blocks / throughput``. Dijkstra over block boundaries;
    ties go to fewer hops, then to the lexicographically smaller route, so planning is stable.
    """
    if not 0 <= start < end:
        raise ValueError(f"block range {start}:{end} is empty or negative")
    banned = set(banned)
    usable = sorted((p for p in peers if p.address not in banned and p.throughput > 0), key=lambda p: p.address)
    gaps = missing_blocks(usable, start, end)
    if gaps:
        raise NoRouteError(gaps, banned & {p.address for p in peers})
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    queue: list[tuple[float, int, tuple[Hop, ...], int]] = [(0.0, 0, (), start)]
    while queue:
        cost, hops, route, block = heapq.heappop(queue)
        if block == end:
            return list(route)
        if (cost, hops) > best.get(block, (float("inf"), 0)):
            continue
        for peer in usable:
            if not peer.start <= block < peer.end:
                continue
            for stop in range(block + 1, min(peer.end, end) + 1):
                step = (cost + hop_overhead_s + (stop - block) / peer.throughput, hops + 1)
                if step < best.get(stop, (float("inf"), 0)):
                    best[stop] = step
                    heapq.heappush(queue, (*step, (*route, Hop(peer.address, block, stop)), stop))
    raise NoRouteError(missing_blocks(usable, start, end) or [(start, end)])  # unreachable: coverage was checked
