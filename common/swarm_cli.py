"""``fedswarm swarm ...``: one command group whose server and client commands live with their roles.

The registry and block-server commands are in ``fedswarm.server.swarm.cli``, the generation
and scoring commands in ``fedswarm.client.swarm.cli``, the HTTP API in ``fedswarm.client.swarm.api_cli``;
all add themselves to this group and build their options on the security options defined here
(roles meet only through ``common/`` and the wire).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

from fedswarm.common.options import option

SECURITY_HELP = "shared swarm token (default: $FEDSWARM_SWARM_TOKEN; empty disables the check)"
ROLE_COMMANDS = ("fedswarm.server.swarm.cli", "fedswarm.client.swarm.cli", "fedswarm.client.swarm.api_cli")


@dataclass(frozen=True, kw_only=True)
class SwarmSecurity:
    """What every swarm process checks: the shared token, and the CA its peers' certificates come from."""

    token: str | None = option(None, SECURITY_HELP)
    tls_ca: str | None = option(None, "CA certificate (PEM) that signed the swarm's server certificates")


@dataclass(frozen=True, kw_only=True)
class SwarmServerSecurity(SwarmSecurity):
    """A server's own certificate and key, besides what every swarm process checks."""

    tls_cert: str | None = option(None, "this server's certificate chain (PEM); enables TLS")
    tls_key: str | None = option(None, "this server's private key (PEM)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "swarm",
        help="serve a model over a swarm of block servers, or query it",
        description="A registry, block servers holding spans of a model, and a client that routes through them.",
    )
    commands = parser.add_subparsers(dest="swarm_command", required=True, metavar="SWARM_COMMAND")
    for module in ROLE_COMMANDS:
        importlib.import_module(module).add_commands(commands)


def security_of(args: argparse.Namespace) -> object:
    from fedswarm.protos.transport import security_from_args

    return security_from_args(args.token, args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
