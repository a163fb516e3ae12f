"""A block server's Prometheus metrics, served over plain HTTP on ``--metrics-port``.

RPCs are counted by a gRPC interceptor (outermost, so calls the token check refuses count as
errors too); the scheduler reports each batch's size; open sessions, queued steps and the KV
cache in use are read when Prometheus scrapes. One registry per server process, never the
process-global default, so several servers in one test process do not collide.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("fedswarm.swarm.metrics")

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    """Every series a block server exports; ``registry`` is what its metrics port serves."""

    def __init__(self, merged_adapter: str = "", registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.merged_adapter = merged_adapter  # the label of requests that name no unmerged adapter
        r = self.registry
        self.requests = Counter("fedswarm_server_requests", "RPCs received", ["method", "adapter"], registry=r)
        self.errors = Counter(
            "fedswarm_server_errors", "RPCs that ended in an error, by gRPC status", ["method", "kind"], registry=r
        )
        self.batch_size = Histogram(
            "fedswarm_server_batch_size",
            "rows of each decode step computed together",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def observe_batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def watch(
        self, sessions: Callable[[], int], queue_depth: Callable[[], int], cache_bytes: Callable[[], int]
    ) -> None:
        """Export the server's state at every scrape: open sessions, queued compute jobs, KV cache reserved."""
        self.registry.register(_StateCollector(sessions, queue_depth, cache_bytes))

    def interceptor(self) -> Any:
        """A gRPC server interceptor counting every call by method and adapter, and its errors by status."""
        import grpc

        metrics = self

        class _Count(grpc.ServerInterceptor):
            def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
                handler = continuation(details)
                if handler is None:
                    return None
                return _counted(handler, details.method.rsplit("/", 1)[-1], metrics)

        return _Count()

    def count(self, method: str, request: Any) -> None:
        adapter = getattr(request, "adapter", "") if request is not None else ""
        self.requests.labels(method, adapter or self.merged_adapter).inc()

    def failed(self, method: str, context: Any) -> None:
        """Count an error the server answered; a client that hung up (its generation ended) is not one."""
        code = context.code() if callable(getattr(context, "code", None)) else None
        if code is None and not context.is_active():
            return
        self.errors.labels(method, getattr(code, "name", None) or "UNKNOWN").inc()


def _counted(handler: Any, method: str, metrics: ServerMetrics) -> Any:
    """``handler`` with its behaviour wrapped: count the call (adapter from its first message) and its error."""
    import grpc

    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    def unary_in(request: Any, context: Any) -> Any:
        metrics.count(method, request)
        try:
            return behavior(request, context)
        except Exception:
            metrics.failed(method, context)
            raise

    def stream_in_stream_out(requests: Iterator[Any], context: Any) -> Iterator[Any]:
        first = next(requests, None)
        metrics.count(method, first)
        chained = itertools.chain([first], requests) if first is not None else iter(())
        try:
            yield from behavior(chained, context)
        except Exception:
            metrics.failed(method, context)
            raise

    options = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_in, **options)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream_in_stream_out, **options)
    return handler  # the swarm has no other kinds of call; anything else passes uncounted


class _StateCollector(Collector):
    def __init__(self, sessions: Callable[[], int], queue: Callable[[], int], cache_bytes: Callable[[], int]) -> None:
        self._sessions, self._queue, self._cache = sessions, queue, cache_bytes

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("fedswarm_server_active_sessions", "inference sessions open", value=self._sessions())
        yield GaugeMetricFamily("fedswarm_server_queue_depth", "compute jobs waiting for the span", value=self._queue())
        yield GaugeMetricFamily(
            "fedswarm_server_kv_cache_bytes", "KV cache reserved by open sessions", value=self._cache()
        )


def start_metrics_http(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread; returns the port (0 picks one)."""
    from prometheus_client import start_http_server

    from fedswarm.common.errors import FedswarmError

    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise FedswarmError(f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    return int(httpd.server_port)
