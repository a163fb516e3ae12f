"""A block server's configuration: what it serves, and how (one CLI option per ``ServeOptions`` field).

Kept apart from the server so building the CLI imports neither gRPC nor torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedswarm.common.config import option
from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import ModelSpec

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")


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
    max_sessions: int = option(64, "concurrent inference sessions")
    max_batch: int = option(8, "rows of concurrent sessions' decode steps computed together")
    batch_wait_ms: float = option(2.0, "longest wait for other sessions' decode steps before computing, ms")
    adapter_poll: float = option(2.0, "seconds between checks of the adapter folders for new versions and adapters")
    metrics_port: int | None = option(None, "HTTP port for Prometheus metrics (0: a free one, printed); default: off")
    num_blocks: int = option(0, "with --blocks auto: how many blocks to hold; 0: all of the model's")
    rebalance_interval: float = option(
        30.0, "with --blocks auto: seconds between checks whether moving would strengthen the swarm; 0: never move"
    )
    rebalance_gain: float = option(
        1.5, "with --blocks auto: move only to close a gap or to multiply the weakest block's throughput by this"
    )


@dataclass(frozen=True)
class AdapterSource:
    """An unmerged adapter served under ``name``, read (and re-read when it changes) from ``folder``."""

    name: str
    folder: Path


def parse_adapters(values: Sequence[str]) -> tuple[Path | None, tuple[AdapterSource, ...]]:
    """``--adapter`` values: at most one ``DIR`` to merge into the base, and any number of ``NAME=DIR``.

    Named folders may not exist yet (a federation's first round has not written them): the
    server watches them. Validation beyond that needs the weights, so it happens at load.
    """
    from fedswarm.common.adapter_digest import check_adapter_folder

    merged: list[Path] = []
    named: dict[str, AdapterSource] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if sep and ADAPTER_NAME.match(name):
            if name in named:
                raise FedswarmError(f"--adapter {value!r}: adapter name {name!r} is given twice")
            if not folder:
                raise FedswarmError(f"--adapter {value!r}: expected NAME=DIR")
            named[name] = AdapterSource(name, Path(folder).expanduser())
        else:
            merged.append(check_adapter_folder(value))
    if len(merged) > 1:
        raise FedswarmError(
            f"--adapter: {len(merged)} folders to merge, at most one (serve others unmerged as NAME=DIR)"
        )
    return (merged[0] if merged else None), tuple(named.values())


@dataclass(frozen=True)
class ServeConfig:
    """What to serve: a span of a model (optionally adapted), announced to some registries."""

    spec: ModelSpec
    start: int  # first block (inclusive)
    end: int  # last block (exclusive)
    registries: tuple[str, ...]  # host:port of each registry to announce to
    adapter: Path | None = None  # PEFT adapter folder merged into the span
    adapters: tuple[AdapterSource, ...] = ()  # unmerged adapters, chosen per request by name
    adapter_roots: tuple[Path, ...] = ()  # folders whose adapter subfolders are served under their names
    options: ServeOptions = ServeOptions()
    auto: bool = False  # --blocks auto: the span was chosen from the swarm's load, and moves with it
