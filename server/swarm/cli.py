"""``fedswarm swarm registry|serve``: the swarm's server side from the command line."""

from __future__ import annotations

import argparse

from fedswarm.common.swarm_cli import add_security, security_of


def add_commands(commands: argparse._SubParsersAction) -> None:
    from fedswarm.common.config import add_arguments
    from fedswarm.server.swarm.options import ServeOptions

    registry = commands.add_parser("registry", help="run a registry of live block servers")
    registry.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    registry.add_argument("--port", type=int, default=0, help="port (0 picks a free one and prints it)")
    add_security(registry, server=True)
    registry.set_defaults(handler=run_registry)

    serve = commands.add_parser("serve", help="serve a span of decoder blocks")
    serve.add_argument("--registry", action="append", required=True, help="HOST:PORT; repeat for several registries")
    serve.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, or a local HF folder")
    serve.add_argument("--blocks", required=True, help="START:END, END exclusive (e.g. 0:15)")
    serve.add_argument("--adapter", help="PEFT LoRA folder to merge into the blocks (e.g. a run's adapter/)")
    add_arguments(serve, ServeOptions)
    add_security(serve, server=True)
    serve.set_defaults(handler=run_serve)


def run_registry(args: argparse.Namespace) -> int:
    from fedswarm.server.swarm.registry import run_registry as run

    return run(args.host, args.port, security_of(args))  # type: ignore[arg-type]


def run_serve(args: argparse.Namespace) -> int:
    from fedswarm.common.adapter_files import check_adapter_folder
    from fedswarm.common.addresses import registries_arg
    from fedswarm.common.config import from_args
    from fedswarm.common.model import parse_model
    from fedswarm.server.swarm.options import ServeConfig, ServeOptions
    from fedswarm.server.swarm.server import parse_blocks, run_server

    start, end = parse_blocks(args.blocks)
    cfg = ServeConfig(
        spec=parse_model(args.model),
        start=start,
        end=end,
        registries=registries_arg(args.registry),
        adapter=check_adapter_folder(args.adapter) if args.adapter else None,
        options=from_args(ServeOptions, args),
    )
    return run_server(cfg, security_of(args))  # type: ignore[arg-type]
