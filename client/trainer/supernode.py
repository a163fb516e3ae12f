"""``flower-supernode`` with a shorter idle poll, for warm nodes.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps a
fixed 3 s before asking again (``start_client_internal``; it also waits for a reply in 0.5 s
sleeps). With the ClientApp warm, that sleep is most of a small round's overhead: a node that
has just replied sleeps through the next round's message. This entry point runs Flower's own
``flower-supernode`` unchanged except that those sleeps last at most ``--poll-interval``
seconds (the SuperLink then sees one request per node per interval while idle), and that
reconnecting to a coordinator that went away backs off to at most ``RECONNECT_MAX_DELAY``
seconds (Flower's: 20), so a restarted coordinator has its nodes back within seconds.

    python -m fedswarm.client.trainer.supernode --poll-interval 0.5 [flower-supernode arguments]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

DEFAULT_POLL = 0.5  # seconds
RECONNECT_MAX_DELAY = 3.0  # seconds: the longest backoff between two tries to reach the coordinator


class _ShortSleeps(ModuleType):
    """The ``time`` module, with every sleep capped at ``longest`` seconds."""

    def __init__(self, longest: float) -> None:
        super().__init__("time")
        self.longest = longest

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.longest))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    poll = DEFAULT_POLL
    if args[:1] == ["--poll-interval"]:
        poll = float(args[1])
        args = args[2:]
    if not poll > 0:
        raise SystemExit(f"--poll-interval must be > 0 seconds, got {poll}")
    from fedswarm.common.flower_internals import flower_supernode, shorten_supernode_waits

    shorten_supernode_waits(_ShortSleeps(poll), RECONNECT_MAX_DELAY)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
