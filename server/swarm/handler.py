"""The block server's RPC handlers: thin checks around :class:`SpanModel`.

All compute runs on the :class:`BatchScheduler`'s one thread: concurrent sessions' decode
steps are batched there (continuous batching), everything else runs alone. Each request
names its unmerged adapter ("" for the base); a session pins the version it opened with.
Hidden states arrive on the CPU; the span computes on its device and answers on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION, from_proto, to_proto
from fedswarm.server.swarm.scheduler import BatchScheduler, SessionState
from fedswarm.server.swarm.served import ServedSpan
from fedswarm.server.swarm.sessions import SessionLimitError, SessionTable

if TYPE_CHECKING:
    import torch

    from fedswarm.server.swarm.adapter_store import AdapterStore
    from fedswarm.server.swarm.blocks import SpanModel
    from fedswarm.server.swarm.unmerged_lora import SpanAdapter

log = logging.getLogger("fedswarm.swarm.handler")


class BlockServicer(swarm_pb2_grpc.BlockServerServicer):
    """Serves ``Info``, stateless ``Forward`` and streaming ``Inference`` for one span (swappable: ``swap``)."""

    def __init__(
        self,
        span: SpanModel,
        info: swarm_pb2.ServerInfo,
        sessions: SessionTable,
        max_length: int,
        adapters: AdapterStore | None = None,
        scheduler: BatchScheduler | None = None,
    ) -> None:
        self.info = info  # replaced (not mutated) when an adapter's version changes or the server moves
        self.sessions = sessions
        self.max_length = max_length  # longest session, in tokens
        scheduler = scheduler or BatchScheduler(span, active_sessions=lambda: sessions.count).start()
        self.served = ServedSpan(span, scheduler, adapters)  # replaced whole by ``swap``; each request keeps its own

    @property
    def span(self) -> SpanModel:
        return self.served.span

    @property
    def scheduler(self) -> BatchScheduler:
        return self.served.scheduler

    @property
    def adapters(self) -> AdapterStore | None:
        return self.served.adapters

    def swap(self, served: ServedSpan) -> ServedSpan:
        """Serve new requests with ``served``; returns the old span, for the caller to retire."""
        old, self.served = self.served, served
        return old

    def _acquire(self) -> ServedSpan:
        """The current span, counted as in use until ``release`` (a span retired meanwhile is skipped)."""
        while True:
            served = self.served
            if served.acquire():
                return served

    def Info(self, request: swarm_pb2.InfoRequest, context: Any) -> swarm_pb2.ServerInfo:  # noqa: N802
        _check_version(request.protocol_version, context)
        return self.info

    def Forward(self, request: swarm_pb2.ForwardRequest, context: Any) -> swarm_pb2.ForwardReply:  # noqa: N802
        _check_version(request.protocol_version, context)
        served = self._acquire()
        try:
            self._check_span(served, request.start, request.end, context)
            hidden = self._hidden(served, request.hidden, context)
            adapter = self._adapter(served, request.adapter, request.adapter_digest, context)
            begin = time.perf_counter()
            span, start, end = served.span, request.start, request.end
            out = served.scheduler.run(lambda: span.forward(hidden, start, end, adapter=adapter))
            ms = (time.perf_counter() - begin) * 1e3
        finally:
            served.release()
        return swarm_pb2.ForwardReply(protocol_version=PROTOCOL_VERSION, hidden=to_proto(out), compute_ms=ms)

    def Inference(  # noqa: N802
        self, requests: Iterator[swarm_pb2.InferenceRequest], context: Any
    ) -> Iterator[swarm_pb2.InferenceReply]:
        first = next(requests, None)
        if first is None:
            return
        _check_version(first.protocol_version, context)
        served = self._acquire()  # the session keeps this span to its end, even if the server moves meanwhile
        try:
            yield from self._session(served, first, requests, context)
        finally:
            served.release()

    def _session(
        self,
        served: ServedSpan,
        first: swarm_pb2.InferenceRequest,
        requests: Iterator[swarm_pb2.InferenceRequest],
        context: Any,
    ) -> Iterator[swarm_pb2.InferenceReply]:
        import grpc

        start, end, max_length = first.start, first.end, first.max_length
        self._check_span(served, start, end, context)
        if not 0 < max_length <= self.max_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_length {max_length} not in 1..{self.max_length}")
        batch = self._hidden(served, first.hidden, context).shape[0]
        adapter = self._adapter(served, first.adapter, first.adapter_digest, context)
        span = served.span
        try:
            session = self.sessions.open(span.cache_bytes(start, end, batch, max_length), context)
        except SessionLimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            state = SessionState(start, end, span.new_cache(start, end, batch, max_length), adapter)
            request: swarm_pb2.InferenceRequest | None = first
            while request is not None:
                if request.adapter and request.adapter != first.adapter:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the session uses adapter {first.adapter or 'none'!r}, not {request.adapter!r}",
                    )
                yield self._step(served, request, state, context)
                self.sessions.touch(session)
                request = next(requests, None)
        finally:
            self.sessions.close(session)

    def _step(self, served: ServedSpan, request: swarm_pb2.InferenceRequest, state: SessionState, context: Any) -> Any:
        import grpc

        _check_version(request.protocol_version, context)
        cache = state.cache
        hidden = self._hidden(served, request.hidden, context)
        if hidden.shape[0] != cache.keys.shape[1]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {hidden.shape[0]} differs from the session's")
        if cache.length + hidden.shape[1] > cache.max_length:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"session holds {cache.length} tokens, {hidden.shape[1]} more exceed its max_length {cache.max_length}",
            )
        begin = time.perf_counter()
        out = served.scheduler.step(state, hidden)
        ms = (time.perf_counter() - begin) * 1e3
        return swarm_pb2.InferenceReply(
            protocol_version=PROTOCOL_VERSION,
            hidden=to_proto(out),
            length=cache.length,
            compute_ms=ms,
            batch_size=state.batch_size,
        )

    def _adapter(self, served: ServedSpan, name: str, digest: str, context: Any) -> SpanAdapter | None:
        """The adapter a request names, in the version it expects; refuses unknown names and old versions."""
        import grpc

        if not name:
            if digest:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"adapter_digest {digest!r} given without an adapter")
            return None
        store = served.adapters
        adapter = store.get(name) if store is not None else None
        if adapter is None:
            names = ", ".join(store.names()) if store is not None else ""
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is not served here (this server has: {names or 'none'})"
            )
            return None  # context.abort raises
        if digest and digest != adapter.digest:
            context.abort(
                grpc.StatusCode.ABORTED,
                f"adapter {name!r} is version {adapter.digest} here, not {digest} (replaced while serving)",
            )
        return adapter

    def _check_span(self, served: ServedSpan, start: int, end: int, context: Any) -> None:
        import grpc

        span = served.span
        if not span.start <= start < end <= span.end:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"blocks {start}:{end} asked, this server holds {span.start}:{span.end}",
            )

    def _hidden(self, served: ServedSpan, message: swarm_pb2.Tensor, context: Any) -> torch.Tensor:
        import grpc

        try:
            hidden = from_proto(message)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        size = served.span.hidden_size
        if hidden.dim() != 3 or hidden.shape[2] != size or hidden.shape[1] == 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden states of shape {tuple(hidden.shape)}, expected [batch, tokens>0, {size}]",
            )
        return hidden  # the span moves it to its device and dtype, and answers on the CPU in the caller's dtype


def _check_version(version: int, context: Any) -> None:
    import grpc

    if version != PROTOCOL_VERSION:
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}",
        )
