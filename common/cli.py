"""The ``fedswarm`` command: each role adds its sub-commands (entry points, declared in pyproject.toml).

``common/`` imports no role package (``tests/test_layout.py``): the roles' command modules are
named in ``[project.entry-points."fedswarm.commands"]`` and loaded here, in the order declared.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, distributions
from typing import Any

from fedswarm.common.errors import FedswarmError

COMMANDS = "fedswarm.commands"  # entry-point group: (sub-parsers) -> None, one per role module


def add_commands(group: str, sub: argparse._SubParsersAction) -> None:
    """Let every module of entry-point ``group`` add its commands to ``sub``; a broken install says so."""
    for entry in registered(group):
        add: Callable[[argparse._SubParsersAction], Any] = entry.load()
        add(sub)


def registered(group: str) -> list[EntryPoint]:
    """The entry points of ``group`` of the installed fedswarm that declares it.

    ``importlib.metadata.entry_points`` reads only the first fedswarm metadata on ``sys.path``; a
    stale ``fedswarm.egg-info`` left in the current folder by an older build would hide the install's.
    """
    for dist in distributions(name="fedswarm"):
        found = [e for e in dist.entry_points if e.group == group]
        if found:
            return found
    raise SystemExit(f"fedswarm: no commands registered ({group!r} entry points): reinstall it (pip install -e .)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedswarm", description="Federated LoRA fine-tuning, swarm serving, edge export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(COMMANDS, sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedswarm.common.logs import setup_logging

    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FedswarmError as exc:  # the user's input; anything else is a bug and shows its traceback
        print(f"fedswarm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedswarm {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
