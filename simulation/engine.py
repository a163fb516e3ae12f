"""Running the fedswarm Flower App on Flower's Simulation Engine (Ray), in this process.

``flwr run .`` does the same through a local SuperLink; this path is for
``fedswarm simulate``: no SuperLink left behind, and Ctrl-C stops Ray and its workers.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from fedswarm.common.config import FederationConfig
from fedswarm.common.stop import clear_stop, request_stop, stop_requested

log = logging.getLogger("fedswarm")

SERVER_APP = "fedswarm.server.coordinator.app:app"
CLIENT_APP = "fedswarm.client.trainer.app:app"


def flower_environment() -> None:
    """Keep Flower from installing the app's dependencies (it would pull CUDA torch) or phoning home."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def backend_config(cfg: FederationConfig) -> dict[str, Any]:
    """Ray resources: each virtual client reserves ``cpus-per-client`` cores and ``gpus-per-client`` GPUs.

    With ``--ray-address`` Ray joins that cluster and Flower sizes its actor pool from
    the cluster's resources, so clients spread over every node; otherwise a local Ray
    gets this machine's cores (and its GPUs, which Ray detects).
    """
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.ray_address:
        init["address"] = cfg.ray_address
    else:  # "local": never attach to a cluster left in /tmp/ray/ray_current_cluster by `ray start`
        init.update(address="local", num_cpus=os.cpu_count() or 1)
    return {
        "client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": max(0.0, cfg.gpus_per_client)},
        "init_args": init,
    }


def run_simulation(cfg: FederationConfig) -> None:
    """Run the ServerApp and ``cfg.clients`` virtual SuperNodes; always shuts Ray down."""
    flower_environment()
    from flwr.app import Context, RecordDict

    from fedswarm.client.trainer.app import app as client_app
    from fedswarm.common.flower_internals import run_simulation_engine
    from fedswarm.server.coordinator.app import app as server_app

    # Clients take their settings from each message's ConfigRecord, so only the
    # ServerApp's context carries the run config.
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    where = f"the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "a local Ray"
    log.info(
        "simulation: %d virtual clients on %s, %s CPUs and %s GPUs per client (plain Flower: flwr run . "
        "--run-config '%s')",
        cfg.clients, where, cfg.cpus_per_client, cfg.gpus_per_client, _run_config_arg(cfg),
    )  # fmt: skip
    previous = signal.signal(signal.SIGINT, _on_interrupt)
    clear_stop()
    try:
        run_simulation_engine(
            num_supernodes=cfg.clients,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(cfg),
            server_app_context=context,
        )
    except (RuntimeError, KeyboardInterrupt) as exc:
        if stop_requested():
            raise KeyboardInterrupt from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        _shutdown_ray()
    if stop_requested():  # the ServerApp thread stopped early; report it as an interruption
        raise KeyboardInterrupt


def _on_interrupt(signum: int, frame: Any) -> None:
    """First Ctrl-C: ask the round loop (another thread) to stop; the second one stops at once."""
    if stop_requested():
        raise KeyboardInterrupt
    log.warning("stopping: the federation ends at its next check; Ctrl-C again to stop at once")
    request_stop()


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _run_config_arg(cfg: FederationConfig) -> str:
    parts = []
    for key, value in cfg.to_run_config().items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")  # TOML booleans
        else:
            parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)
