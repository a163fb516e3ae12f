"""The fedswarm ServerApp: reads the run config and runs the federation."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedswarm.common.config import FederationConfig, from_run_config
from fedswarm.common.logs import setup_logging
from fedswarm.server.coordinator.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = from_run_config(FederationConfig, context.run_config)
    run_federation(grid, cfg)
