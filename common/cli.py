"""The ``fedswarm`` command: one sub-command per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedswarm.common.errors import FedswarmError

COMMANDS = (
    "fedswarm.simulation.simulate",
    "fedswarm.client.edge.export",
    "fedswarm.client.edge.serve",
    "fedswarm.common.swarm_cli",
    "fedswarm.server.coordinator.launch",
    "fedswarm.client.trainer.launch",
    "fedswarm.server.coordinator.submit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedswarm", description="Federated LoRA fine-tuning, swarm serving, edge export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
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
