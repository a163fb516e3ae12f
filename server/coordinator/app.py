"""The fedswarm ServerApp: reads the run config and runs the federation."""

from __future__ import annotations

import logging
from dataclasses import replace

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedswarm.common.config import FederationConfig, from_run_config
from fedswarm.common.errors import FedswarmError
from fedswarm.common.flower_internals import is_simulation_grid
from fedswarm.common.logs import setup_logging
from fedswarm.server.coordinator.federation import run_federation
from fedswarm.server.coordinator.rounds import simulation_node_count

log = logging.getLogger("fedswarm")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = from_run_config(FederationConfig, context.run_config)
    simulated = is_simulation_grid(grid)  # a simulation: `flwr run .` or `fedswarm simulate`
    if simulated and not cfg.resume:
        cfg = fit_to_simulation(cfg, simulation_node_count(grid, cfg.clients))
    run_federation(grid, cfg, simulated=simulated)


def fit_to_simulation(cfg: FederationConfig, nodes: int) -> FederationConfig:
    """In a simulation ``clients`` is an upper bound: train on the SuperNodes it has.

    Flower's local federation has 2 SuperNodes unless told otherwise, and none join later, so
    waiting for more would only time out. A deployment (``fedswarm coordinator``) waits for
    every configured client instead: its nodes join when they start.
    """
    if nodes >= cfg.clients:
        return cfg
    if nodes < max(cfg.min_clients, 1):
        raise FedswarmError(
            f"the simulation has {nodes} SuperNodes and the run needs {max(cfg.min_clients, 1)} (--min-clients); "
            f"set its size with `flwr federation simulation-config ... --num-supernodes {cfg.clients}`"
        )
    log.warning("note: %d nodes connected, training on %d of the configured %d clients", nodes, nodes, cfg.clients)
    return replace(cfg, clients=nodes, clients_per_round=min(cfg.clients_per_round, nodes))
