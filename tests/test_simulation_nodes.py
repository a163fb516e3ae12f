"""Under a simulation the ServerApp trains on the SuperNodes there are; a deployment waits for every client."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest
from flwr.app import Context, RecordDict
from flwr.superlink.grid import InMemoryGrid

import fedswarm.server.coordinator.app as server_app
from fedswarm.common.config import FederationConfig
from fedswarm.common.errors import FedswarmError
from fedswarm.server.coordinator.rounds import simulation_node_count


class NodesGrid:
    """A grid whose registered nodes follow a script: one list of ids per ``get_node_ids`` call, the last repeated."""

    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)
        self.calls = 0

    def get_node_ids(self) -> Iterable[int]:
        count = self.counts[min(self.calls, len(self.counts) - 1)]
        self.calls += 1
        return list(range(1, count + 1))


class SimulationGrid(NodesGrid, InMemoryGrid):
    """An ``InMemoryGrid`` (what Flower's Simulation Engine hands the ServerApp) without a link state."""


def test_node_count_returns_once_every_client_is_there():
    grid = NodesGrid(0, 0, 4)
    assert simulation_node_count(grid, 4, patience=5.0, settle=1.0) == 4  # type: ignore[arg-type]
    assert grid.calls == 3


def test_node_count_settles_on_a_smaller_federation():
    assert simulation_node_count(NodesGrid(0, 2), 4, patience=5.0, settle=0.3) == 2  # type: ignore[arg-type]
    assert simulation_node_count(NodesGrid(0), 4, patience=0.3, settle=0.1) == 0  # type: ignore[arg-type]


def test_fewer_nodes_train_with_a_note(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("fedswarm"), "propagate", True)  # setup_logging() may have turned it off
    cfg = FederationConfig(model="tiny", clients=4)
    with caplog.at_level(logging.WARNING, logger="fedswarm"):
        fitted = server_app.fit_to_simulation(cfg, 2)
    assert fitted.clients == 2 and fitted.min_clients == 0 and fitted.lora_rank == cfg.lora_rank
    assert "note: 2 nodes connected, training on 2 of the configured 4 clients" in caplog.text
    assert server_app.fit_to_simulation(cfg, 4) is cfg
    assert server_app.fit_to_simulation(cfg, 6) is cfg  # clients is an upper bound


def test_too_few_nodes_for_min_clients_is_one_line():
    with pytest.raises(FedswarmError, match=r"has 2 SuperNodes and the run needs 3 \(--min-clients\)"):
        server_app.fit_to_simulation(FederationConfig(clients=4, min_clients=3), 2)
    with pytest.raises(FedswarmError, match="has 0 SuperNodes"):
        server_app.fit_to_simulation(FederationConfig(clients=4), 0)


@pytest.mark.parametrize("grid_class, trained", [(SimulationGrid, 2), (NodesGrid, 4)])
def test_only_a_simulation_adapts_the_deployment_waits_for_all(monkeypatch, grid_class, trained):
    seen: list[FederationConfig] = []
    monkeypatch.setattr(server_app, "run_federation", lambda grid, cfg, **_: seen.append(cfg))
    monkeypatch.setattr(server_app, "simulation_node_count", lambda grid, wanted: len(list(grid.get_node_ids())))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"model": "tiny"})
    server_app.main(grid_class(2), context)  # type: ignore[arg-type]
    assert [cfg.clients for cfg in seen] == [trained]
