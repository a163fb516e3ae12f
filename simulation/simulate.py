"""``fedswarm simulate``: a local federation of virtual clients on Ray."""

from __future__ import annotations

import argparse
from dataclasses import replace

from fedswarm.common.config import FederationConfig, add_arguments, federation_from_args

AUTO_GPU_SHARE = 0.25


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "simulate",
        help="run a local federated simulation (Flower Simulation Engine on Ray)",
        description="Fine-tune LoRA across N virtual clients on this machine; writes a run folder.",
    )
    add_arguments(parser, FederationConfig)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedswarm.common.data import load_examples
    from fedswarm.common.device import check_quantize_base, resolve_device
    from fedswarm.common.errors import FedswarmError, InputError
    from fedswarm.common.model import parse_model
    from fedswarm.common.partition import parse_partition
    from fedswarm.simulation.engine import run_simulation

    cfg = federation_from_args(args)
    parse_model(cfg.model)  # fail here, in one line, before Ray starts
    records = load_examples(cfg.data, cfg.max_samples)  # every record parsed: a malformed one stops us here
    if cfg.balance_labels and any(r.label is None for r in records):
        raise FedswarmError(f"--balance-labels needs labelled data; --data {cfg.data!r} has unlabelled records")
    parse_partition(cfg.partition)
    device = resolve_device(cfg.device)
    check_quantize_base(cfg.quantize_base, device)
    if cfg.gpus_per_client < 0:  # auto: four clients share a GPU; none on a CPU-only machine
        cfg = replace(cfg, gpus_per_client=AUTO_GPU_SHARE if device == "cuda" else 0.0)
    if device == "cuda" and cfg.gpus_per_client == 0 and not cfg.ray_address:
        raise InputError("--device cuda with --gpus-per-client 0: Ray would hide the GPU from every client")
    run_simulation(cfg)
    return 0
