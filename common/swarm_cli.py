"""``fedswarm swarm ...``: one command group whose server and client commands live with their roles.

The registry and block-server commands are in ``fedswarm.server.swarm.cli``, the generation
and scoring commands in ``fedswarm.client.swarm.cli``; both add themselves to this group and
share the security options defined here (roles meet only through ``common/`` and the wire).
"""

from __future__ import annotations

import argparse
import importlib

SECURITY_HELP = "shared swarm token (default: $FEDSWARM_SWARM_TOKEN; empty disables the check)"
ROLE_COMMANDS = ("fedswarm.server.swarm.cli", "fedswarm.client.swarm.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "swarm",
        help="serve a model over a swarm of block servers, or query it",
        description="A registry, block servers holding spans of a model, and a client that routes through them.",
    )
    commands = parser.add_subparsers(dest="swarm_command", required=True, metavar="SWARM_COMMAND")
    for module in ROLE_COMMANDS:
        importlib.import_module(module).add_commands(commands)


def add_security(parser: argparse.ArgumentParser, server: bool) -> None:
    parser.add_argument("--token", default=None, help=SECURITY_HELP)
    parser.add_argument("--tls-ca", help="CA certificate (PEM) that signed the swarm's server certificates")
    if server:
        parser.add_argument("--tls-cert", help="this server's certificate chain (PEM); enables TLS")
        parser.add_argument("--tls-key", help="this server's private key (PEM)")


def security_of(args: argparse.Namespace) -> object:
    from fedswarm.protos.transport import security_from_args

    return security_from_args(args.token, args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
