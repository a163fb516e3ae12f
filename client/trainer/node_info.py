"""Where a client ran: host name, Ray node (in a Ray simulation) and torch device."""

from __future__ import annotations

import socket


def node_info(device: str) -> dict[str, str]:
    info = {"host": socket.gethostname(), "device": device}
    try:
        import ray

        if ray.is_initialized():
            info["ray-node"] = ray.get_runtime_context().get_node_id()
    except ImportError:  # deployment nodes need not have Ray
        pass
    return info
