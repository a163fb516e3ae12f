"""``fedswarm simulate``: a local federation of virtual clients on Ray."""

from __future__ import annotations

import argparse

from fedswarm.common.config import FederationConfig, add_arguments, from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "simulate",
        help="run a local federated simulation (Flower Simulation Engine on Ray)",
        description="Fine-tune LoRA across N virtual clients on this machine; writes a run folder.",
    )
    add_arguments(parser, FederationConfig)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedswarm.common.data import resolve_data
    from fedswarm.common.model import parse_model
    from fedswarm.simulation.engine import run_simulation
    from fedswarm.simulation.partition import parse_partition

    cfg = from_args(FederationConfig, args)
    parse_model(cfg.model)  # fail here, in one line, before Ray starts
    resolve_data(cfg.data)
    parse_partition(cfg.partition)
    run_simulation(cfg)
    return 0
