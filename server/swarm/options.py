"""A block server's configuration: what it serves, and how (one CLI option per ``ServeOptions`` field).

Kept apart from the server so building the CLI imports neither gRPC nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedswarm.common.config import option
from fedswarm.common.model import ModelSpec


@dataclass(frozen=True)
class ServeOptions:
    """How a block server runs; ``fedswarm swarm serve`` generates one option per field."""

    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(0, "port to listen on; 0 picks a free one")
    public_host: str = option("", "host name clients should dial; empty: --host")
    device: str = option("auto", "where the span's weights and KV caches live: auto (cuda when usable), cpu, cuda")
    threads: int = option(0, "torch threads; 0 leaves torch's default")
    throughput: float = option(0.0, "block-tokens/s to announce; 0 measures it at start")
    ttl: float = option(15.0, "registry entry lifetime in seconds, refreshed every ttl/3")
    cache_mb: float = option(1024.0, "KV-cache budget over all sessions, MiB")
    max_length: int = option(4096, "longest inference session, tokens")
    session_idle: float = option(60.0, "seconds after which a silent session is closed")


@dataclass(frozen=True)
class ServeConfig:
    """What to serve: a span of a model (optionally adapted), announced to some registries."""

    spec: ModelSpec
    start: int  # first block (inclusive)
    end: int  # last block (exclusive)
    registries: tuple[str, ...]  # host:port of each registry to announce to
    adapter: Path | None = None  # PEFT adapter folder merged into the span
    options: ServeOptions = ServeOptions()
