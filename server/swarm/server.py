"""A block server process: load a span, measure it, serve it, announce it.

Order matters: the server measures its throughput and starts listening before it
announces, so a client never finds it in a registry before it can answer.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

from fedswarm.common.memory import peak_rss_mb
from fedswarm.common.security.transport import Security, bind_server, server_interceptors
from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.server.swarm.options import ServeConfig

if TYPE_CHECKING:
    from fedswarm.server.swarm.served import ServedSpan
    from fedswarm.server.swarm.sessions import SessionTable

log = logging.getLogger("fedswarm.swarm.server")


def parse_blocks(value: str) -> tuple[int, int]:
    """``START:END`` (END exclusive) to a pair, with a one-line error otherwise."""
    from fedswarm.common.errors import FedswarmError

    try:
        start_text, end_text = value.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise FedswarmError(f"--blocks {value!r}: expected START:END, e.g. 0:15 (END exclusive)") from None
    if not 0 <= start < end:
        raise FedswarmError(f"--blocks {value!r}: need 0 <= START < END")
    return start, end


def start_server(cfg: ServeConfig, security: Security) -> tuple[Any, Any, swarm_pb2.ServerInfo, str]:
    """Load, measure, listen and announce; returns the gRPC server, its announcer, its info and its device."""
    import grpc
    import torch

    from fedswarm.common.device import resolve_device
    from fedswarm.common.errors import FedswarmError
    from fedswarm.server.swarm.announcer import Announcer
    from fedswarm.server.swarm.blocks import num_blocks
    from fedswarm.server.swarm.handler import BlockServicer
    from fedswarm.server.swarm.metrics import ServerMetrics, start_metrics_http
    from fedswarm.server.swarm.sessions import SessionTable
    from fedswarm.server.swarm.throughput import measure_throughput

    opts = cfg.options
    for name in ("max_sessions", "max_batch"):
        if getattr(opts, name) < 1:
            raise FedswarmError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be >= 1")
    device = resolve_device(opts.device)  # a one-line error before anything loads
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    sessions = SessionTable(int(opts.cache_mb * 2**20), opts.session_idle, max_sessions=opts.max_sessions)
    adapter, served = _load(cfg, cfg.start, cfg.end, device, sessions, strict=True)
    span, adapters, scheduler = served.span, served.adapters, served.scheduler
    throughput = opts.throughput or measure_throughput(span)
    workers = opts.max_sessions + 8  # a thread per open session, and some for Forward and Info
    metrics = ServerMetrics(adapter)
    metrics.watch(lambda: sessions.count, lambda: servicer.scheduler.queue_depth, lambda: sessions.used_bytes)
    scheduler.on_batch = metrics.observe_batch
    interceptors = [metrics.interceptor(), *server_interceptors(security)]  # outermost: refused calls count too
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors)
    port = bind_server(server, opts.host, opts.port, security)
    info = swarm_pb2.ServerInfo(
        address=f"{opts.public_host or opts.host}:{port}",
        model_id=cfg.spec.model_id,
        start=cfg.start,
        end=cfg.end,
        throughput=throughput,
        adapter_id=adapter,
        num_blocks=num_blocks(cfg.spec),
        version=_version(),
    )
    served.announce_adapters(info)
    servicer = BlockServicer(span, info, sessions, opts.max_length, adapters, scheduler)
    swarm_pb2_grpc.add_BlockServerServicer_to_server(servicer, server)
    server.start()
    if opts.metrics_port is not None:
        metrics_port = start_metrics_http(metrics.registry, opts.host, opts.metrics_port)
        print(f"metrics on http://{opts.host}:{metrics_port}/metrics", flush=True)
    stop = threading.Event()
    sessions.start_reaper(stop)
    announcer = Announcer(cfg.registries, info, opts.ttl, security)
    announcer.start()
    publish = _publisher(servicer, announcer)

    def reannounce() -> None:
        publish(lambda fresh: servicer.served.announce_adapters(fresh))

    def watch(served: ServedSpan) -> None:
        if (cfg.adapters or cfg.adapter_roots) and served.adapters is not None:
            served.adapters.start_watcher(served.stopped, reannounce, opts.adapter_poll)

    watch(servicer.served)
    if cfg.auto and opts.rebalance_interval > 0:

        def load(start: int, end: int) -> ServedSpan:
            served = _load(cfg, start, end, device, sessions, strict=False)[1]
            served.scheduler.on_batch = metrics.observe_batch
            watch(served)
            return served

        _start_rebalancer(cfg, security, servicer, publish, stop, load)
    log.info(
        "serving blocks %d:%d of %s on %s (device %s): %.1f MiB of weights, %.0f block-tokens/s, merged adapter "
        "%s, unmerged adapters %s, peak RSS %.0f MiB",
        cfg.start, cfg.end, cfg.spec.model_id, info.address, span.device, span.param_bytes() / 2**20, throughput,
        adapter or "none", ", ".join(f"{a.name}={a.digest}" for a in info.adapters) or "none", peak_rss_mb(),
    )  # fmt: skip
    return server, announcer, info, device


def _load(
    cfg: ServeConfig, start: int, end: int, device: str, sessions: SessionTable, strict: bool
) -> tuple[str, ServedSpan]:
    """Blocks ``start:end`` ready to serve (merged adapter, unmerged ones, compute thread); returns the merged
    adapter's id too. ``strict`` (at start-up) fails in one line on a bad adapter folder; else it is logged."""
    from fedswarm.server.swarm.adapter_store import AdapterStore
    from fedswarm.server.swarm.blocks import load_span
    from fedswarm.server.swarm.merged_adapter import merge_adapter
    from fedswarm.server.swarm.scheduler import BatchScheduler
    from fedswarm.server.swarm.served import ServedSpan

    opts = cfg.options
    span = load_span(cfg.spec, start, end, device)
    adapter = merge_adapter(span, cfg.adapter) if cfg.adapter is not None else ""
    adapters = AdapterStore(span, cfg.adapters, cfg.adapter_roots)
    adapters.poll(strict=strict)  # a bad adapter folder fails now, in one line; a missing one is watched
    scheduler = BatchScheduler(span, opts.max_batch, opts.batch_wait_ms / 1e3, lambda: sessions.count).start()
    return adapter, ServedSpan(span, scheduler, adapters)


def _publisher(servicer: Any, announcer: Any) -> Callable[[Callable[[swarm_pb2.ServerInfo], None]], None]:
    """Edits of the server's info (a new adapter version, a move), each served and announced in turn."""
    lock = threading.Lock()

    def publish(edit: Callable[[swarm_pb2.ServerInfo], None]) -> None:
        with lock:
            fresh = swarm_pb2.ServerInfo()
            fresh.CopyFrom(servicer.info)
            edit(fresh)
            servicer.info = fresh
            announcer.update(fresh)

    return publish


def _start_rebalancer(
    cfg: ServeConfig,
    security: Security,
    servicer: Any,
    publish: Callable[[Callable[[swarm_pb2.ServerInfo], None]], None],
    stop: threading.Event,
    load: Callable[[int, int], ServedSpan],
) -> None:
    from fedswarm.server.swarm.rebalance import Rebalancer, SpanMover, SwarmKey, list_swarm

    info = servicer.info
    key = SwarmKey(info.model_id, info.adapter_id, info.num_blocks)
    mover = SpanMover(servicer, load, publish, drain_s=cfg.options.session_idle)
    lister = lambda: list_swarm(cfg.registries, security, key.model_id)  # noqa: E731
    rebalancer = Rebalancer(key, lister, lambda: servicer.info, mover, cfg.options.rebalance_gain)
    rebalancer.start(stop, cfg.options.rebalance_interval)


def run_server(cfg: ServeConfig, security: Security) -> int:
    """``fedswarm swarm serve``: serve until SIGTERM/SIGINT, then withdraw from the registries."""
    server, announcer, info, device = start_server(cfg, security)
    print(f"server ready on {info.address} blocks {info.start}:{info.end} device {device}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        announcer.stop()
        server.stop(grace=1.0)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedswarm")
    except PackageNotFoundError:
        return "dev"
