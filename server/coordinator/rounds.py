"""Sending a round's messages and collecting replies as they arrive, with progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedswarm.common.stop import check_stop

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


@dataclass
class Collected:
    replies: list[Message] = field(default_factory=list)  # replies without an error
    failures: list[str] = field(default_factory=list)  # why each failed node failed
    bytes_down: int = 0
    bytes_up: int = 0
    late: int = 0  # messages still unanswered when the round closed on enough good replies (dropped)


def content_bytes(msg: Message) -> int:
    """Bytes of a message's records (arrays + metrics + configs), as Flower counts them."""
    return int(sum(_record_bytes(record) for record in msg.content.values()))


def _record_bytes(record: object) -> int:
    """Flower's ``count_bytes``, except that an empty string counts 0 bytes (Flower 1.42 raises on it)."""
    if isinstance(record, ConfigRecord):
        return sum(len(k) + _value_bytes(v) for k, v in record.items())
    return int(record.count_bytes())  # type: ignore[attr-defined]


def _value_bytes(value: object) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, str | bytes):
        return len(value)
    return 1 if isinstance(value, bool) else 8


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[Message, int, int], None] | None = None,
    enough: int = 0,
    good: Callable[[Message], bool] | None = None,
) -> Collected:
    """Push ``messages`` and pull replies until all arrive, ``enough`` good ones have (``good``: which
    reply counts; 0: wait for all), or ``timeout`` seconds pass.

    Nodes that reply with an error or do not reply in time are counted as failures; when the round
    closes on ``enough`` good replies, the messages still unanswered are counted as ``late`` and their
    replies are never pulled (a later round asks only for its own). The round goes on with the replies
    that arrived.
    """
    messages = list(messages)
    out = Collected(bytes_down=sum(content_bytes(m) for m in messages))
    pending = set(grid.push_messages(messages))
    total = len(pending)
    deadline = time.monotonic() + timeout
    counted = 0
    while pending and time.monotonic() < deadline:
        check_stop()
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                out.failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            else:
                out.bytes_up += content_bytes(reply)
                out.replies.append(reply)
                counted += int(good is None or good(reply))
            if on_reply is not None:
                on_reply(reply, total - len(pending), total)
            if enough and counted >= enough:
                break
        if enough and counted >= enough:
            out.late = len(pending)
            return out
        if pending:
            time.sleep(POLL_SECONDS)
    out.failures.extend(f"message {mid}: no reply within {timeout:.0f} s" for mid in pending)
    return out


SIMULATION_PATIENCE_S = 15.0  # longest wait for a simulation's SuperNodes to register
SIMULATION_SETTLE_S = 2.0  # a simulation registers its SuperNodes at once: a count this old is final


def simulation_node_count(
    grid: Grid, wanted: int, patience: float = SIMULATION_PATIENCE_S, settle: float = SIMULATION_SETTLE_S
) -> int:
    """How many SuperNodes a simulation has: it registers all of them at its start, and none later.

    Returns once ``wanted`` are registered, else once the count (above 0) has not changed for
    ``settle`` seconds, or after ``patience`` seconds.
    """
    deadline = time.monotonic() + patience
    count, since = -1, time.monotonic()
    while True:
        now, seen = time.monotonic(), len(list(grid.get_node_ids()))
        if seen >= wanted:
            return seen
        if seen != count:
            count, since = seen, now
        elif count > 0 and now - since >= settle:
            return count
        if now >= deadline:
            return count
        time.sleep(POLL_SECONDS)
