"""Where a block server with ``--blocks auto`` sits: pure, deterministic placement (Petals' block selection).

The swarm's strength at a block is the sum of the throughputs of the servers holding it (a
server's announced block-tokens/s counts in full for each of its blocks, as the client's
route planner assumes); a generation is as fast as the weakest block allows, and a block
nobody holds stops every generation. So:

- a joining server takes the span that maximises the swarm's per-block strengths in
  *leximin* order (the weakest block first, then the next weakest, ...), which closes gaps
  first; ties go to the span whose blocks are weakest today, then to the lowest start;
- a running server moves only when moving closes a gap, or raises the weakest block's
  strength by at least ``min_gain`` times (hysteresis: small gains do not make servers flap);
- when several servers would gain by moving, one at a time does: candidates are ranked the
  same way by every server (best result first, then address), and the server ranked ``k``
  moves only after ``k`` more checks find the swarm still unbalanced, so a herd of servers
  seeing the same gap does not jump into it together (and one that cannot move, e.g. a
  server with fixed blocks, only delays the next).

Every server that reads the same announcements computes the same answer: sums are taken in
address order and every tie has a rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Announced:
    """One server as the registry lists it."""

    address: str
    start: int  # first block (inclusive)
    end: int  # last block (exclusive)
    throughput: float  # block-tokens per second


@dataclass(frozen=True)
class Move:
    """A move worth making: to blocks ``start:end``, by the server ranked ``rank`` among those that would gain."""

    start: int
    end: int
    rank: int  # 0: this server moves first; k: k other servers are asked to move before it


def block_strengths(servers: Sequence[Announced], num_blocks: int) -> list[float]:
    """Per-block sum of the throughputs of the servers holding it (spans clipped to the model)."""
    strengths = [0.0] * num_blocks
    for server in sorted(servers, key=lambda s: s.address):
        if server.throughput <= 0:
            continue
        for block in range(max(server.start, 0), min(server.end, num_blocks)):
            strengths[block] += server.throughput
    return strengths


def choose_span(servers: Sequence[Announced], num_blocks: int, length: int, throughput: float) -> tuple[int, int]:
    """The span of ``length`` blocks (clamped to the model) that best strengthens the swarm of ``servers``."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    length = min(length, num_blocks)
    strengths = block_strengths(servers, num_blocks)
    start = min(
        range(num_blocks - length + 1),
        key=lambda s: (_leximin_key(_with(strengths, s, s + length, throughput)), sum(strengths[s : s + length]), s),
    )
    return start, start + length


def should_move(servers: Sequence[Announced], me: Announced, num_blocks: int, min_gain: float = 1.5) -> Move | None:
    """Whether ``me`` (at its current span, whatever ``servers`` says of it) should move, and where.

    ``servers`` is the swarm as listed; an entry with ``me``'s address is replaced by ``me``.
    Returns None when ``me`` gains too little by moving (see the module docstring).
    """
    if min_gain < 1.0:
        raise ValueError(f"min_gain must be >= 1, got {min_gain}")
    swarm = {s.address: s for s in servers if s.address != me.address}
    swarm[me.address] = me
    candidates = []
    for address in sorted(swarm):
        others = [s for a, s in swarm.items() if a != address]
        gain = _gain(others, swarm[address], num_blocks, min_gain)
        if gain is not None:
            candidates.append((gain[0], address, gain[1]))
    candidates.sort()
    for rank, (_, address, (start, end)) in enumerate(candidates):
        if address == me.address:
            return Move(start, end, rank)
    return None


def _gain(
    others: Sequence[Announced], me: Announced, num_blocks: int, min_gain: float
) -> tuple[tuple[float, ...], tuple[int, int]] | None:
    """The leximin key of the swarm after ``me`` moves to its best span, and that span; None if not worth it."""
    length = min(me.end, num_blocks) - max(me.start, 0)
    if length < 1 or me.throughput <= 0:
        return None
    start, end = choose_span(others, num_blocks, length, me.throughput)
    base = block_strengths(others, num_blocks)
    now = _with(base, max(me.start, 0), min(me.end, num_blocks), me.throughput)
    moved = _with(base, start, end, me.throughput)
    gaps_now, gaps_moved = now.count(0.0), moved.count(0.0)
    if gaps_moved < gaps_now or (
        gaps_now == gaps_moved == 0 and min(moved) >= min_gain * min(now) and min(moved) > min(now)
    ):
        return _leximin_key(moved), (start, end)
    return None


def _with(strengths: list[float], start: int, end: int, throughput: float) -> list[float]:
    """``strengths`` with a server of ``throughput`` added on blocks ``start:end``."""
    return [t + throughput if start <= block < end else t for block, t in enumerate(strengths)]


def _leximin_key(strengths: list[float]) -> tuple[float, ...]:
    """Smaller is better: the strengths sorted weakest first, negated (so ``min`` picks the leximin best)."""
    return tuple(-t for t in sorted(strengths))
