"""``fedswarm swarm registry|serve``: the swarm's server side from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fedswarm.common.options import (
    add_arguments,
    from_args,
    host_option,
    model_option,
    option,
    registry_option,
    required,
)
from fedswarm.common.swarm_cli import SwarmSecurity, SwarmServeSecurity, security_of
from fedswarm.server.swarm.options import ServeOptions


@dataclass(frozen=True, kw_only=True)
class RegistryCommand(SwarmSecurity):
    """``fedswarm swarm registry``."""

    host: str = host_option()
    port: int = option(0, "port (0 picks a free one and prints it)")
    deny: list[str] | None = option(
        None, "SHA-256 fingerprint of a server certificate to drop and refuse (repeatable)", repeat=True
    )
    deny_file: str | None = option(
        None, "file of fingerprints to drop and refuse, one per line; re-read whenever it changes"
    )
    client_port: int | None = option(
        None,
        "a second port where clients list the servers with the swarm token in place of a client certificate "
        "(TLS; nobody announces there); default: none",
    )


@dataclass(frozen=True, kw_only=True)
class ServeTarget:
    """What a block server serves and whom it announces it to."""

    registry: list[str] = registry_option()
    model: str = model_option()
    blocks: str = required(
        "START:END, END exclusive (e.g. 0:15); or auto: take the --num-blocks blocks the swarm needs most, "
        "and move when the swarm's load changes"
    )
    adapter: list[str] | None = option(
        None,
        "NAME=DIR: serve the PEFT LoRA folder DIR (e.g. a run's adapter/) unmerged as NAME, reloaded when it "
        "changes; repeat for several. A bare DIR is merged into the blocks (at most one)",
        repeat=True,
    )
    adapter_dir: list[str] | None = option(
        None,
        "ROOT: serve every subfolder of ROOT that is a PEFT adapter (or holds one in adapter/, as a run does) "
        "unmerged under the subfolder's name, including ones added while serving; repeatable",
        repeat=True,
    )


@dataclass(frozen=True, kw_only=True)
class ServeCommand(SwarmServeSecurity, ServeOptions, ServeTarget):
    """``fedswarm swarm serve``: what to serve, how (``ServeOptions``), and its security."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser("registry", help="run a registry of live block servers")
    add_arguments(registry, RegistryCommand)
    registry.set_defaults(handler=run_registry)

    serve = commands.add_parser("serve", help="serve a span of decoder blocks")
    add_arguments(serve, ServeCommand)
    serve.set_defaults(handler=run_serve)


def run_registry(args: argparse.Namespace) -> int:
    from fedswarm.common.errors import FedswarmError
    from fedswarm.server.swarm.registry import DenyList
    from fedswarm.server.swarm.registry import run_registry as run

    if (args.deny or args.deny_file) and args.insecure:
        raise FedswarmError("--deny needs server certificates: it cannot apply with --insecure")
    security = security_of(args)
    try:
        deny = DenyList(args.deny or (), Path(args.deny_file) if args.deny_file else None)
    except ValueError as exc:
        raise FedswarmError(f"--deny: {exc}") from None
    if args.client_port is not None and (args.insecure or not security.token):  # type: ignore[attr-defined]
        raise FedswarmError("--client-port needs TLS and the swarm token (--token or $FEDSWARM_SWARM_TOKEN)")
    return run(args.host, args.port, security, deny, args.client_port)  # type: ignore[arg-type]


def run_serve(args: argparse.Namespace) -> int:
    from fedswarm.common.addresses import registries_arg
    from fedswarm.common.errors import FedswarmError
    from fedswarm.common.model import parse_model
    from fedswarm.server.swarm.options import ServeConfig, parse_adapters
    from fedswarm.server.swarm.server import parse_blocks, run_server

    auto = args.blocks.strip().lower() == "auto"
    options = from_args(ServeOptions, args)
    if not auto and options.num_blocks:
        raise FedswarmError("--num-blocks applies to --blocks auto only (START:END says how many blocks)")
    start, end = (0, 0) if auto else parse_blocks(args.blocks)
    spec, registries = parse_model(args.model), registries_arg(args.registry)
    merged, adapters = parse_adapters(args.adapter or [])
    security = security_of(args)
    if auto:
        from fedswarm.server.swarm.rebalance import auto_span

        start, end = auto_span(spec, merged, registries, security, options)  # type: ignore[arg-type]
    cfg = ServeConfig(
        spec=spec,
        start=start,
        end=end,
        registries=registries,
        adapter=merged,
        adapters=adapters,
        adapter_roots=tuple(Path(root).expanduser() for root in args.adapter_dir or []),
        options=options,
        auto=auto,
    )
    return run_server(cfg, security)  # type: ignore[arg-type]
