"""``fedswarm swarm ...``: one command group whose server and client commands live with their roles.

The registry and block-server commands are in ``fedswarm.server.swarm.cli``, the generation
and scoring commands in ``fedswarm.client.swarm.cli``, the HTTP API in ``fedswarm.client.swarm.api_cli``;
all add themselves to this group (entry points ``fedswarm.swarm_commands`` in pyproject.toml) and
build their options on the security options defined here (roles meet only through ``common/`` and
the wire).

Every swarm process is secure by default: mutual TLS with certificates from the federation's CA
(``fedswarm certs --issue server|client``), or ``--insecure`` (plaintext, warned) on a trusted machine.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from fedswarm.common.options import flag, option

SWARM_COMMANDS = "fedswarm.swarm_commands"  # entry-point group: the roles' swarm commands


@dataclass(frozen=True, kw_only=True)
class SwarmSecurity:
    """What every swarm process presents and checks: its certificate, the federation's CA, the token."""

    tls_ca: str | None = option(None, "the federation's CA certificate (PEM): every peer's must be signed by it")
    tls_cert: str | None = option(
        None,
        "this process's certificate (PEM) from `fedswarm certs --issue`: a server's names the address it "
        "announces, a client's identifies it to the servers",
    )
    tls_key: str | None = option(None, "the private key (PEM) of --tls-cert")
    token: str | None = option(
        None, "shared swarm token, checked on top of the certificates (default: $FEDSWARM_SWARM_TOKEN; empty: none)"
    )
    insecure: bool = flag("plaintext, no certificates: anyone who reaches the swarm can read and join it")


@dataclass(frozen=True, kw_only=True)
class SwarmServeSecurity(SwarmSecurity):
    """A block server's security, with how its clients authenticate."""

    client_auth: str = option(
        "certificate",
        "how clients authenticate: certificate (mutual TLS, a client certificate of the CA) or token "
        "(TLS, and the swarm token in place of a client certificate)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "swarm",
        help="serve a model over a swarm of block servers, or query it",
        description="A registry, block servers holding spans of a model, and a client that routes through them.",
    )
    commands = parser.add_subparsers(dest="swarm_command", required=True, metavar="SWARM_COMMAND")
    from fedswarm.common.cli import add_commands

    add_commands(SWARM_COMMANDS, commands)


def security_of(args: argparse.Namespace, client: bool = False) -> object:
    """The process's ``Security``; a one-line error (exit 2) without TLS files and without ``--insecure``.

    A ``client`` may authenticate with the swarm token instead of a certificate (``--tls-ca`` alone).
    """
    from fedswarm.common.errors import FedswarmError
    from fedswarm.common.security.transport import security_from_args

    client_auth = getattr(args, "client_auth", "certificate")
    if client_auth not in ("certificate", "token"):
        raise FedswarmError(f"--client-auth {client_auth!r}: choose certificate or token")
    return security_from_args(
        args.token,
        args.tls_ca,
        args.tls_cert,
        args.tls_key,
        insecure=args.insecure,
        client=client,
        client_certs=client_auth == "certificate",
    )
